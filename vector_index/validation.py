"""Boundary checks for vectors and PQ geometry, with messages a user can act on."""

from __future__ import annotations

import numpy as np


KINDS = ("flat", "pq", "ivfpq", "ivfflat", "hnsw", "hnswpq", "opqpq", "rq", "lsq")  # the index kinds a shard can build
IVF_KINDS = ("ivfpq", "ivfflat")  # kinds with federated coarse centroids (nlist, nprobe)
ADDITIVE_KINDS = ("rq", "lsq")  # M full-dimensional codebooks summed (faiss residual / local-search quantizers)


class VectorError(ValueError):
    """Vectors or a PQ configuration that fedvec refuses to work with."""


def check_vectors(x: np.ndarray, *, dim: int | None = None, name: str = "vectors") -> np.ndarray:
    """Return ``x`` as C-contiguous float32 [n, d], or raise naming what is wrong.

    Only float32/float64 are accepted: silently casting ints or strings hides mistakes
    such as loading ids instead of vectors.
    """
    if not isinstance(x, np.ndarray):
        raise VectorError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise VectorError(
            f"{name}: dtype {x.dtype} is not supported; use float32 (or float64)"
        )
    if x.ndim != 2:
        raise VectorError(f"{name}: expected a 2-D array [n, d], got shape {x.shape}")
    if x.shape[0] == 0:
        raise VectorError(f"{name}: empty (0 vectors)")
    if dim is not None and x.shape[1] != dim:
        raise VectorError(f"{name}: dimension {x.shape[1]} does not match expected {dim}")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise VectorError(
            f"{name}: {bad.size} vector(s) contain NaN or inf (first rows: {bad[:5].tolist()})"
        )
    with np.errstate(over="ignore"):
        sq = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))
    if sq.max() > np.finfo(np.float32).max:  # float32 storage or faiss's float32 distances would overflow
        bad = np.flatnonzero(sq > np.finfo(np.float32).max)
        raise VectorError(
            f"{name}: {bad.size} vector(s) too large for float32 (largest |value| {np.abs(x).max():.3g}; squared norms "
            f"must stay below {np.finfo(np.float32).max:.3g}; first rows: {bad[:5].tolist()})"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def check_additive_geometry(m: int, nbits: int) -> None:
    """An additive quantizer needs M >= 1 codebooks of 2**nbits codewords, 1 <= nbits <= 16."""
    if m < 1:
        raise VectorError(f"additive quantizer: M={m} must be >= 1")
    if not 1 <= nbits <= 16:
        raise VectorError(f"additive quantizer: nbits={nbits} is out of range; use 1..16")


def check_pq_geometry(d: int, m: int, nbits: int) -> None:
    """PQ needs d divisible by M and 1 <= nbits <= 16 (faiss's limits for PQ codes)."""
    if m < 1:
        raise VectorError(f"PQ: M={m} must be >= 1")
    if d % m != 0:
        raise VectorError(f"PQ: dimension d={d} is not divisible by M={m} (d % M = {d % m})")
    if not 1 <= nbits <= 16:
        raise VectorError(f"PQ: nbits={nbits} is out of range; use 1..16")
