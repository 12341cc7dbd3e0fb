"""Codebooks as plain arrays, and faiss quantizers/indexes built from them.

A codebook is ``C[M, K, dsub]``; IVF coarse centroids are the same shape with M=1 and
``dsub = d``, so one set of functions serves both. Injection never re-trains: an index
built here encodes exactly as faiss would after training to the same centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .validation import VectorError, check_pq_geometry


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index a shard builds from the global state."""

    kind: str  # "flat" | "pq" | "ivfpq"
    m: int = 8
    nbits: int = 8
    nlist: int = 0
    nprobe: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "pq", "ivfpq"):
            raise VectorError(f"index kind {self.kind!r} is not one of flat, pq, ivfpq")
        if self.kind == "ivfpq" and self.nlist < 1:
            raise VectorError(f"ivfpq needs nlist >= 1, got {self.nlist}")

    @property
    def levels(self) -> tuple[str, ...]:
        """The codebook levels this index needs, coarse first (residuals depend on it)."""
        return {"flat": (), "pq": ("pq",), "ivfpq": ("coarse", "pq")}[self.kind]

    def level_shape(self, level: str, d: int) -> tuple[int, int, int]:
        if level == "coarse":
            return (1, self.nlist, d)
        check_pq_geometry(d, self.m, self.nbits)
        return (self.m, 1 << self.nbits, d // self.m)

    def factory_string(self) -> str:
        """The faiss factory description of the centralized reference index."""
        pq = f"PQ{self.m}x{self.nbits}np"
        return {"flat": "Flat", "pq": pq, "ivfpq": f"IVF{self.nlist},{pq}"}[self.kind]

    def code_size(self, d: int) -> int:
        if self.kind == "flat":
            return 4 * d
        return (self.m * self.nbits + 7) // 8


def split_subspaces(x: np.ndarray, m: int) -> np.ndarray:
    """[n, d] -> [m, n, d/m] contiguous sub-vectors, the view PQ trains on."""
    n, d = x.shape
    return np.ascontiguousarray(x.reshape(n, m, d // m).transpose(1, 0, 2))


def make_product_quantizer(codebook: np.ndarray) -> faiss.ProductQuantizer:
    m, k, dsub = codebook.shape
    nbits = int(k).bit_length() - 1
    if 1 << nbits != k:
        raise VectorError(f"codebook has K={k} centroids per sub-space; K must be a power of 2")
    pq = faiss.ProductQuantizer(m * dsub, m, nbits)
    inject_codebook(pq, codebook)
    return pq


def inject_codebook(pq: faiss.ProductQuantizer, codebook: np.ndarray) -> None:
    expected = (pq.M, pq.ksub, pq.dsub)
    if codebook.shape != expected:
        raise VectorError(f"codebook shape {codebook.shape} does not match the quantizer's {expected}")
    faiss.copy_array_to_vector(np.ascontiguousarray(codebook, dtype=np.float32).ravel(), pq.centroids)
    pq.sync_transposed_centroids()


def coarse_assign(x: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatL2(coarse.shape[2])
    index.add(np.ascontiguousarray(coarse[0]))
    return index.search(x, 1)[1].ravel()


def residuals(x: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """x minus its nearest coarse centroid: the space an IVF-PQ codebook lives in."""
    return np.ascontiguousarray(x - coarse[0][coarse_assign(x, coarse)])


def reconstruct(x: np.ndarray, codebooks: dict[str, np.ndarray]) -> np.ndarray:
    """What the compressed index stores for ``x`` (coarse centroid + PQ of the residual)."""
    base = np.zeros_like(x)
    if "coarse" in codebooks:
        base = codebooks["coarse"][0][coarse_assign(x, codebooks["coarse"])]
    if "pq" not in codebooks:
        return base if "coarse" in codebooks else x.copy()
    pq = make_product_quantizer(codebooks["pq"])
    r = np.ascontiguousarray(x - base)
    return base + pq.decode(pq.compute_codes(r))


def squared_errors(x: np.ndarray, codebooks: dict[str, np.ndarray]) -> np.ndarray:
    """Per-vector ||x - q(x)||^2 under the given codebooks."""
    return ((x - reconstruct(x, codebooks)) ** 2).sum(axis=1)


def build_index(spec: IndexSpec, x: np.ndarray, ids: np.ndarray, codebooks: dict[str, np.ndarray]) -> faiss.Index:
    """A searchable faiss index over ``x`` from injected (not trained) codebooks."""
    d = x.shape[1]
    if spec.kind == "flat":
        index: faiss.Index = faiss.IndexIDMap(faiss.IndexFlatL2(d))
    elif spec.kind == "pq":
        inner = faiss.IndexPQ(d, spec.m, spec.nbits)
        inject_codebook(inner.pq, codebooks["pq"])
        inner.is_trained = True
        index = faiss.IndexIDMap(inner)
    else:
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(np.ascontiguousarray(codebooks["coarse"][0]))
        index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, spec.nbits)
        inject_codebook(index.pq, codebooks["pq"])
        index.is_trained = True
        index.precompute_table()
        index.nprobe = spec.nprobe
    index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def train_reference_index(spec: IndexSpec, x: np.ndarray, seed: int) -> faiss.Index:
    """Centralized faiss index trained on pooled data: the reference to compare with."""
    index = faiss.index_factory(x.shape[1], spec.factory_string())
    if spec.kind != "flat":
        inner = faiss.downcast_index(index)
        inner.pq.cp.seed = seed
        if spec.kind == "ivfpq":
            inner.cp.seed = seed
            inner.nprobe = spec.nprobe
    index.train(x)
    index.add(x)
    return index
