"""Federated codebook maths on numpy arrays: Lloyd statistics, updates, one-shot init.

Every function takes and returns codebooks shaped ``[M, K, dsub]`` (IVF coarse
centroids use M=1). Clients compute statistics; the server only ever sees sums,
counts and centroids, never a raw vector.
"""

from __future__ import annotations

import faiss
import numpy as np
from faiss.contrib.clustering import DatasetAssign, reassign_centroids

from vector_index.quantizers import split_subspaces
from vector_index.validation import VectorError, check_vectors


def lloyd_statistics(x: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per sub-space and centroid: sum and count of assigned sub-vectors, plus the SSE.

    Summing these over shards and dividing gives exactly one Lloyd step on the union.
    """
    m, k, dsub = codebook.shape
    x = check_vectors(x, dim=m * dsub, name="shard vectors")
    sums = np.zeros((m, k, dsub), dtype=np.float64)
    counts = np.zeros((m, k), dtype=np.int64)
    sse = 0.0
    for j, sub in enumerate(split_subspaces(x, m)):
        assign, dist, s = DatasetAssign(sub).assign_to(np.ascontiguousarray(codebook[j]))
        sums[j] = s
        counts[j] = np.bincount(assign, minlength=k)
        sse += float(dist.sum())
    return sums, counts, sse


def lloyd_update(
    sums: np.ndarray, counts: np.ndarray, previous: np.ndarray, empty: str, seed: int
) -> tuple[np.ndarray, int]:
    """New centroids = sums / counts. Returns them and how many were empty.

    ``empty="split"`` is faiss's own policy (``reassign_centroids``: an empty centroid
    takes half of a large cluster); ``"keep"`` leaves it at its previous value, which
    is the right thing for a local refinement that sees only part of the data.
    """
    if empty not in ("split", "keep"):
        raise ValueError(f"empty={empty!r} must be 'split' or 'keep'")
    out = previous.astype(np.float32).copy()
    rs = np.random.RandomState(seed)
    n_empty = 0
    for j in range(previous.shape[0]):
        filled = counts[j] > 0
        out[j, filled] = (sums[j, filled] / counts[j, filled, None]).astype(np.float32)
        n_empty += int((~filled).sum())
        if empty == "split" and not filled.all() and filled.any():
            reassign_centroids(counts[j].copy(), out[j], rs)
    return out, n_empty


def local_refinement(x: np.ndarray, codebook: np.ndarray, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A few local Lloyd iterations from the global codebook (a baseline's client step).

    Returns the refined codebook and how many local vectors each centroid had last.
    """
    out = codebook
    counts = np.zeros(codebook.shape[:2], dtype=np.int64)
    for _ in range(iters):
        sums, counts, _ = lloyd_statistics(x, out)
        out, _ = lloyd_update(sums, counts, out, "keep", seed)
    return out, counts


def local_centroids(x: np.ndarray, m: int, k: int, niter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means per sub-space on a client's vectors: ``[M, k', dsub]`` and counts.

    ``k' = min(k, n)``: a client with fewer vectors than centroids sends its
    sub-vectors themselves (each with count 1), so it still contributes.
    """
    x = check_vectors(x, name="shard vectors")
    n, d = x.shape
    if m < 1 or d % m != 0:
        raise VectorError(f"shard vectors: dimension d={d} is not divisible by M={m}")
    kk = min(k, n)
    subs = split_subspaces(x, m)
    cents = np.zeros((m, kk, subs.shape[2]), dtype=np.float32)
    counts = np.zeros((m, kk), dtype=np.int64)
    for j, sub in enumerate(subs):
        if kk == n:
            cents[j], counts[j] = sub, 1
            continue
        km = faiss.Kmeans(sub.shape[1], kk, niter=niter, seed=seed + j, verbose=False)
        km.cp.min_points_per_centroid = 1
        km.train(sub)
        cents[j] = km.centroids
        counts[j] = np.bincount(km.index.search(sub, 1)[1].ravel(), minlength=kk)
    return cents, counts


def weighted_merge(
    centroids: list[np.ndarray], counts: list[np.ndarray], k: int, niter: int, seed: int
) -> np.ndarray:
    """One-shot k-FED-style init: weighted faiss k-means over all clients' centroids."""
    pooled = np.concatenate(centroids, axis=1)
    weights = np.concatenate(counts, axis=1).astype(np.float32)
    m, total, dsub = pooled.shape
    if total < k:
        raise ValueError(
            f"the federation sent {total} local centroids per sub-space but the codebook "
            f"needs K={k}; it holds too few vectors for this nbits/nlist"
        )
    out = np.zeros((m, k, dsub), dtype=np.float32)
    for j in range(m):
        keep = weights[j] > 0
        km = faiss.Kmeans(dsub, k, niter=niter, seed=seed + j, verbose=False)
        km.cp.min_points_per_centroid = 1
        km.train(np.ascontiguousarray(pooled[j][keep]), weights=np.ascontiguousarray(weights[j][keep]))
        out[j] = km.centroids
    return out


def weighted_average(codebooks: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Element-wise average of codebooks (the baselines: centroid j must mean the same
    thing on every client for this to make sense, which is why it loses on non-IID)."""
    w = np.asarray(weights, dtype=np.float64)
    stacked = np.stack([c.astype(np.float64) for c in codebooks])
    return (np.tensordot(w / w.sum(), stacked, axes=1)).astype(np.float32)
