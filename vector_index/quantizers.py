"""Codebooks as plain arrays, and faiss quantizers/indexes built from them.

A codebook is ``C[M, K, dsub]``; IVF coarse centroids are the same shape with M=1 and
``dsub = d``, so one set of functions serves both. Injection never re-trains: an index
built here encodes exactly as faiss would after training to the same centroids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import faiss
import numpy as np

from . import additive
from .validation import ADDITIVE_KINDS, IVF_KINDS, KINDS, VectorError, check_additive_geometry, check_pq_geometry


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index a shard builds from the global state.

    ``opqpq`` is PQ behind a rotation: in federated training the rotation is the shared
    encoder, so :func:`build_index` builds the PQ part and the caller (or the store, via
    :func:`with_transform`) applies the rotation. ``hnsw``/``hnswpq`` wrap an HNSW graph
    in an id map because HNSW cannot take user ids itself. ``rq``/``lsq`` are faiss's
    additive quantizers: M full-dimensional codebooks of 2**nbits codewords, encoded by
    beam search (``beam_size``) or local search (``ils_iters``), stored without norms
    (faiss's ST_decompress, M*nbits bits per vector).
    """

    kind: str  # one of KINDS
    m: int = 8
    nbits: int = 8
    nlist: int = 0
    nprobe: int = 1
    hnsw_m: int = 32
    ef_search: int = 64
    ef_construction: int = 40
    beam_size: int = additive.RQ_BEAM_SIZE
    ils_iters: int = additive.LSQ_ENCODE_ILS_ITERS
    stage_rounds: int = 0  # rq: federated Lloyd rounds per stage before block updates (additive.round_plan)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VectorError(f"index kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in IVF_KINDS and self.nlist < 1:
            raise VectorError(f"{self.kind} needs nlist >= 1, got {self.nlist}")
        if self.kind in IVF_KINDS and not 1 <= self.nprobe <= self.nlist:
            raise VectorError(f"{self.kind} needs 1 <= nprobe <= nlist={self.nlist}, got nprobe={self.nprobe}")
        if self.stage_rounds < 0 or (self.stage_rounds and self.kind != "rq"):
            raise VectorError(f"stage_rounds={self.stage_rounds}: only rq trains stage by stage (>= 0)")
        for name in ("hnsw_m", "ef_search", "ef_construction", "beam_size", "ils_iters"):
            if getattr(self, name) < 1:
                raise VectorError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "IndexSpec":
        """The inverse of ``dataclasses.asdict``; unknown keys are refused, not dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VectorError(f"index description has unknown field(s) {unknown}; known: {sorted(known)}")
        if "kind" not in d:
            raise VectorError("index description has no 'kind'")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def levels(self) -> tuple[str, ...]:
        """The codebook levels this index needs, coarse first (residuals depend on it)."""
        return {"ivfpq": ("coarse", "pq"), "ivfflat": ("coarse",), "flat": (), "hnsw": (), "rq": ("rq",), "lsq": ("lsq",)}.get(self.kind, ("pq",))

    def level_shape(self, level: str, d: int) -> tuple[int, int, int]:
        if level == "coarse":
            return (1, self.nlist, d)
        if level in ADDITIVE_KINDS:
            check_additive_geometry(self.m, self.nbits)
            return (self.m, 1 << self.nbits, d)
        check_pq_geometry(d, self.m, self.nbits)
        return (self.m, 1 << self.nbits, d // self.m)

    def factory_string(self) -> str:
        """The faiss factory description of the centralized reference index."""
        pq = f"PQ{self.m}x{self.nbits}"
        return {
            "flat": "Flat",
            "pq": pq + "np",
            "ivfpq": f"IVF{self.nlist},{pq}np",
            "ivfflat": f"IVF{self.nlist},Flat",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
            "hnswpq": f"HNSW{self.hnsw_m},{pq}",
            "opqpq": f"OPQ{self.m},{pq}np",
            "rq": f"RQ{self.m}x{self.nbits}",
            "lsq": f"LSQ{self.m}x{self.nbits}",
        }[self.kind]

    def code_size(self, d: int) -> int:
        """Bytes per vector of the codes (HNSW graph links, ~8*hnsw_m bytes, not included)."""
        if self.kind in ("flat", "hnsw", "ivfflat"):
            return 4 * d
        return (self.m * self.nbits + 7) // 8


def additive_quantizer(spec: IndexSpec, codebook: np.ndarray) -> faiss.AdditiveQuantizer:
    """The faiss RQ/LSQ of ``spec`` holding ``codebook`` [M, K, d]: encodes as the shard's index does."""
    if spec.kind == "rq":
        return additive.rq_from_codebooks(codebook, spec.beam_size)
    return additive.lsq_from_codebooks(codebook, spec.ils_iters)


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


def reconstruct(x: np.ndarray, codebooks: dict[str, np.ndarray], spec: IndexSpec | None = None) -> np.ndarray:
    """What the compressed index stores for ``x`` (coarse centroid + PQ of the residual,
    or the additive quantizer's sum of codewords; ``spec`` says how it encodes)."""
    for kind in ADDITIVE_KINDS:
        if kind in codebooks:
            aq = additive_quantizer(spec or IndexSpec(kind, m=codebooks[kind].shape[0]), codebooks[kind])
            x = np.ascontiguousarray(x, dtype=np.float32)
            return aq.decode(aq.compute_codes(x))
    base = np.zeros_like(x)
    if "coarse" in codebooks:
        base = codebooks["coarse"][0][coarse_assign(x, codebooks["coarse"])]
    if "pq" not in codebooks:
        return base if "coarse" in codebooks else x.copy()
    pq = make_product_quantizer(codebooks["pq"])
    r = np.ascontiguousarray(x - base)
    return base + pq.decode(pq.compute_codes(r))


def squared_errors(x: np.ndarray, codebooks: dict[str, np.ndarray], spec: IndexSpec | None = None) -> np.ndarray:
    """Per-vector ||x - q(x)||^2 under the given codebooks."""
    return ((x - reconstruct(x, codebooks, spec)) ** 2).sum(axis=1)


def check_codebooks(spec: IndexSpec, d: int, codebooks: dict[str, np.ndarray], strict: bool = False) -> dict[str, np.ndarray]:
    """The levels ``spec`` needs as float32 arrays of the right shape, or a VectorError.

    ``strict`` also refuses levels the index would ignore (a store should not persist
    arrays it never uses: they would suggest an encoding that is not there).
    """
    missing = [lvl for lvl in spec.levels if lvl not in codebooks]
    if missing:
        raise VectorError(f"{spec.kind} index needs codebook level(s) {missing}; got {sorted(codebooks)}")
    extra = sorted(set(codebooks) - set(spec.levels))
    if strict and extra:
        raise VectorError(f"{spec.kind} index uses levels {list(spec.levels)}; unexpected level(s) {extra}")
    out = {}
    for level in spec.levels:
        book = np.asarray(codebooks[level])
        expected = spec.level_shape(level, d)
        if book.shape != expected:
            raise VectorError(f"codebook level {level!r}: shape {book.shape} does not match {expected} for d={d}")
        if book.dtype not in (np.float32, np.float64) or not np.isfinite(book).all():
            raise VectorError(f"codebook level {level!r}: must be finite float32/float64 (dtype {book.dtype})")
        out[level] = np.ascontiguousarray(book, dtype=np.float32)
    return out


def empty_index(spec: IndexSpec, d: int, codebooks: dict[str, np.ndarray]) -> faiss.Index:
    """An empty, ready-to-add faiss index taking user ids, codebooks injected (not trained)."""
    books = check_codebooks(spec, d, codebooks)
    if spec.kind in ("flat", "hnsw"):
        inner: faiss.Index = faiss.IndexFlatL2(d) if spec.kind == "flat" else faiss.IndexHNSWFlat(d, spec.hnsw_m)
    elif spec.kind in ("pq", "opqpq"):
        inner = faiss.IndexPQ(d, spec.m, spec.nbits)
        inject_codebook(inner.pq, books["pq"])
        inner.is_trained = True
    elif spec.kind == "hnswpq":
        inner = faiss.IndexHNSWPQ(d, spec.m, spec.hnsw_m, spec.nbits)
        storage = faiss.downcast_index(inner.storage)
        inject_codebook(storage.pq, books["pq"])
        storage.pq.compute_sdc_table()  # graph construction compares codes with codes
        storage.is_trained = inner.is_trained = True
    elif spec.kind in ADDITIVE_KINDS:
        inner = additive.additive_index(spec.kind, books[spec.kind], beam_size=spec.beam_size, encode_ils_iters=spec.ils_iters)
    elif spec.kind == "ivfflat":  # stores ids itself; the raw vectors in the lists of the federated centroids
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(books["coarse"][0])
        index = faiss.IndexIVFFlat(quantizer, d, spec.nlist)
        index.is_trained = True
        index.nprobe = spec.nprobe
        return index
    else:  # ivfpq stores ids itself
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(books["coarse"][0])
        index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, spec.nbits)
        inject_codebook(index.pq, books["pq"])
        index.is_trained = True
        index.precompute_table()
        index.nprobe = spec.nprobe
        return index
    if spec.kind.startswith("hnsw"):
        inner.hnsw.efSearch = spec.ef_search
        inner.hnsw.efConstruction = spec.ef_construction
    return faiss.IndexIDMap(inner)


def build_index(spec: IndexSpec, x: np.ndarray, ids: np.ndarray, codebooks: dict[str, np.ndarray]) -> faiss.Index:
    """A searchable faiss index over ``x`` from injected (not trained) codebooks.

    For ``opqpq`` ``x`` must already be rotated (see :func:`with_transform`).
    """
    index = empty_index(spec, x.shape[1], codebooks)
    index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


CODE_KINDS = ("pq", "ivfpq", "opqpq", "rq", "lsq")  # kinds whose index is rebuilt from stored codes alone


def _codec_parts(index: faiss.Index) -> tuple[faiss.IndexPreTransform | None, faiss.Index]:
    """(the pre-transform or None, the index that takes ids) of an index from :func:`empty_index`."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return index, faiss.downcast_index(index.index)
    return None, index


def sa_codes(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """faiss's standalone codes of ``x`` for ``index`` (uint8 [n, code size]), transform applied.

    For ivfpq the code holds the list number then the PQ code, as ``IndexIVF.sa_encode``.
    """
    pre, inner = _codec_parts(index)
    if pre is not None:
        for i in range(pre.chain.size()):
            x = pre.chain.at(i).apply(x)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    return inner.sa_encode(np.ascontiguousarray(x, dtype=np.float32))


def add_codes(index: faiss.Index, codes: np.ndarray, ids: np.ndarray) -> None:
    """Add vectors by their stored codes, without re-encoding (the same index as ``add_with_ids``)."""
    pre, inner = _codec_parts(index)
    inner.add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8), np.ascontiguousarray(ids, dtype=np.int64))
    if pre is not None:
        pre.ntotal = inner.ntotal


def build_index_with_errors(
    spec: IndexSpec, x: np.ndarray, ids: np.ndarray, codebooks: dict[str, np.ndarray], decoded_search: bool = False
) -> tuple[faiss.Index, np.ndarray]:
    """:func:`build_index` and :func:`squared_errors` of the same vectors, encoding them
    once: for the code kinds the index is filled from the codes and the errors come
    from decoding them (faiss's own decode, the same floats as :func:`reconstruct`).

    ``decoded_search`` (rq/lsq): return instead a flat index over the decoded vectors.
    faiss's additive index stored without norms (ST_decompress) decodes every code for
    every query, ~100x slower than one BLAS search over the decodings, whose distances
    are the same ||q - decode(code)||^2 to float rounding (tested).
    """
    if spec.kind not in CODE_KINDS:
        return build_index(spec, x, ids, codebooks), squared_errors(x, codebooks, spec)
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = empty_index(spec, x.shape[1], codebooks)
    codes = sa_codes(index, x)
    add_codes(index, codes, ids)
    _, inner = _codec_parts(index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    decoded = inner.sa_decode(codes)
    if decoded_search and spec.kind in ADDITIVE_KINDS:
        index = faiss.IndexIDMap(faiss.IndexFlatL2(x.shape[1]))
        index.add_with_ids(decoded, np.ascontiguousarray(ids, dtype=np.int64))
    return index, ((x - decoded) ** 2).sum(axis=1)


def check_transform(a: np.ndarray, b: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [d, d], b [d]) as finite float32, or a VectorError (the encoder keeps dimension d)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != (d, d) or b.shape != (d,):
        raise VectorError(f"encoder transform: expected A {(d, d)} and b {(d,)}, got A {a.shape} and b {b.shape}")
    for name, arr in (("A", a), ("b", b)):
        if arr.dtype not in (np.float32, np.float64) or not np.isfinite(arr).all():
            raise VectorError(f"encoder transform: {name} must be finite float32/float64 (dtype {arr.dtype})")
    return np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


def with_transform(index: faiss.Index, a: np.ndarray, b: np.ndarray) -> faiss.IndexPreTransform:
    """``index`` behind z = x @ A.T + b, so faiss encodes stored vectors and queries alike.

    ``index`` must be empty: vectors added before the wrap would not have been encoded.
    """
    if index.ntotal:
        raise VectorError("with_transform: wrap the index before adding vectors")
    d = index.d
    a, b = check_transform(a, b, d)
    lt = faiss.LinearTransform(d, d, True)
    faiss.copy_array_to_vector(a.ravel(), lt.A)
    faiss.copy_array_to_vector(b, lt.b)
    lt.is_trained = True
    return faiss.IndexPreTransform(lt, index)


def train_reference_index(spec: IndexSpec, x: np.ndarray, seed: int, add: bool = True, few_points: bool = False) -> faiss.Index:
    """Centralized faiss index trained on pooled data: the reference to compare with.

    ``add=False`` only trains (e.g. to take its codebooks with :func:`reference_codebooks`).
    ``few_points``: RQ's k-means accepts a small sample without warning for every stage.
    """
    index = faiss.index_factory(x.shape[1], spec.factory_string())
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if spec.kind == "opqpq" else outer
    if spec.kind in ("hnsw", "hnswpq"):
        inner.hnsw.efSearch = spec.ef_search
        inner.hnsw.efConstruction = spec.ef_construction
    if spec.kind == "hnswpq":
        faiss.downcast_index(inner.storage).pq.cp.seed = seed
    elif spec.kind in ("pq", "ivfpq", "opqpq"):
        inner.pq.cp.seed = seed
    if spec.kind in IVF_KINDS:
        inner.cp.seed = seed
        inner.nprobe = spec.nprobe
    if spec.kind == "rq":
        inner.rq.max_beam_size = spec.beam_size
        inner.rq.cp.seed = seed
        if few_points:
            inner.rq.cp.min_points_per_centroid = 1
    if spec.kind == "lsq":  # random_seed stays faiss's: shards encode with it (additive.LSQ_RANDOM_SEED)
        inner.lsq.encode_ils_iters = spec.ils_iters
    index.train(x)
    if add:
        index.add(x)
    return index


def train_additive(spec: IndexSpec, x: np.ndarray, seed: int) -> np.ndarray:
    """faiss's own RQ/LSQ training on ``x`` (e.g. public vectors): ``[M, K, d]`` codebooks.

    Few vectors per codeword are allowed here (an init from a public sample), so faiss's
    "please provide at least ..." warning is not printed for every stage. LSQ starts from
    faiss's RQ codebooks: LSQ's own training solves for M*K codewords by least squares
    and overfits a small sample (GloVe, 2,000 public vectors, M=10, K=256: MSE 0.365
    on the base with LSQ's own codebooks, 0.127 with RQ's encoded by LSQ's ICM).
    """
    rq = IndexSpec("rq", m=spec.m, nbits=spec.nbits, beam_size=spec.beam_size)
    index = train_reference_index(rq, np.ascontiguousarray(x, dtype=np.float32), seed, add=False, few_points=True)
    return reference_codebooks(rq, index)[0]["rq"]


def reference_codebooks(spec: IndexSpec, index: faiss.Index) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """The codebooks (and, for opqpq, the rotation as (A, b)) of a trained reference index.

    Lets a store or benchmark inject centrally trained codebooks exactly as federated ones.
    """
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if spec.kind == "opqpq" else outer
    books: dict[str, np.ndarray] = {}
    if "pq" in spec.levels:
        pq = faiss.downcast_index(inner.storage).pq if spec.kind == "hnswpq" else inner.pq
        books["pq"] = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    if spec.kind in IVF_KINDS:
        books["coarse"] = inner.quantizer.reconstruct_n(0, inner.nlist)[None]
    if spec.kind in ADDITIVE_KINDS:
        books[spec.kind] = additive.additive_codebooks(inner.rq if spec.kind == "rq" else inner.lsq)
    transform = None
    if spec.kind == "opqpq":
        opq = faiss.downcast_VectorTransform(outer.chain.at(0))
        a = faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in)
        transform = (a, np.zeros(opq.d_out, dtype=np.float32))
    return books, transform
