"""Partitioners: which base rows each client holds. Deterministic under a seed.

Every partitioner returns a list of int64 row-index arrays that together cover every
row exactly once.
"""

from __future__ import annotations

import faiss
import numpy as np

from .validation import VectorError


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise VectorError(f"num_clients={num_clients} must be >= 1")
    if num_clients > n:
        raise VectorError(f"num_clients={num_clients} exceeds the {n} base vectors")


def iid(x: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    n = x.shape[0]
    _check(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def cluster_labels(x: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """k-means cluster of every row: the 'kind' of record each organisation holds."""
    km = faiss.Kmeans(x.shape[1], num_clusters, niter=20, seed=seed, verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1].ravel()


def dirichlet(x: np.ndarray, num_clients: int, alpha: float, num_clusters: int, seed: int) -> list[np.ndarray]:
    """Non-IID: each cluster's rows are spread over clients with Dirichlet(alpha) shares.

    Small alpha gives each client a few clusters. A client left empty takes one row
    from the largest client, so every shard holds at least one vector.
    """
    n = x.shape[0]
    _check(n, num_clients)
    if alpha <= 0:
        raise VectorError(f"dirichlet alpha={alpha} must be > 0")
    labels = cluster_labels(x, num_clusters, seed)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_clusters):
        rows = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * rows.size).astype(int)
        for k, chunk in enumerate(np.split(rows, cuts)):
            parts[k].append(chunk)
    out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    for k in range(num_clients):
        if out[k].size == 0:
            big = int(np.argmax([p.size for p in out]))
            out[k], out[big] = out[big][-1:], out[big][:-1]
    return out


def by_cluster(x: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Extreme non-IID: one k-means cluster per client."""
    _check(x.shape[0], num_clients)
    labels = cluster_labels(x, num_clients, seed)
    out = [np.flatnonzero(labels == k).astype(np.int64) for k in range(num_clients)]
    if any(p.size == 0 for p in out):
        raise VectorError("by_cluster: k-means left a client without vectors; use fewer clients")
    return out
