"""What a client may release from its shard: aggregates over at least ``min_count``
vectors, never a centroid or cell that could be one (or a few) raw vectors.

Pure functions on numpy arrays; ``client_tasks`` calls them just before a reply is packed.
"""

from __future__ import annotations

import numpy as np


class Withheld(Exception):
    """This shard releases nothing for this request; the reason is sent instead."""


def check_shard_size(n: int, min_count: int) -> None:
    if n < min_count:
        raise Withheld(f"this shard holds {n} vector(s), fewer than its min-count={min_count}: it sends no statistics")


def init_k(n: int, local_k: int, min_count: int) -> int:
    """How many local centroids a shard of ``n`` vectors may ask for: never more than
    ``n // min_count``, so a small shard asks for fewer instead of sending its vectors."""
    check_shard_size(n, min_count)
    return max(1, min(local_k, n // min_count))


def supported_centroids(centroids: np.ndarray, counts: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per sub-space, only centroids supported by >= min_count vectors.

    Sub-spaces keep different numbers, so the result is padded to a common width with
    zero-count rows (weight 0: ignored by the server's weighted merge).
    """
    keep = counts >= min_count
    width = max(int(keep.sum(axis=1).max()), 1)
    out = np.zeros((centroids.shape[0], width, centroids.shape[2]), dtype=np.float32)
    out_counts = np.zeros((centroids.shape[0], width), dtype=counts.dtype)
    for j in range(centroids.shape[0]):
        rows = np.flatnonzero(keep[j])
        out[j, : rows.size] = centroids[j, rows]
        out_counts[j, : rows.size] = counts[j, rows]
    return out, out_counts


def suppress_small_cells(sums: np.ndarray, counts: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Zero the Lloyd statistics of cells with 0 < count < min_count.

    Returns the released sums, counts and how many cells were suppressed. The server's
    step then moves such a centroid with the other shards' statistics only.
    """
    small = (counts > 0) & (counts < min_count)
    sums, counts = sums.copy(), counts.copy()
    sums[small] = 0
    counts[small] = 0
    return sums, counts, int(small.sum())


def keep_unsupported_at(previous: np.ndarray, refined: np.ndarray, counts: np.ndarray, min_count: int) -> np.ndarray:
    """A locally refined codebook in which every centroid with < min_count local vectors
    stays at the value the server sent: it then tells the server nothing."""
    out = refined.copy()
    small = counts < min_count
    out[small] = previous[small]
    return out


def fill_unsupported(centroids: np.ndarray, counts: np.ndarray, min_count: int) -> np.ndarray:
    """A full-size codebook trained on this shard alone in which every centroid with
    < min_count vectors is replaced by a copy of a supported one (the most populated),
    so the codebook keeps its shape and releases no small cell."""
    out = centroids.copy()
    for j in range(centroids.shape[0]):
        small = counts[j] < min_count
        if small.all():
            raise Withheld(f"no centroid of sub-space {j} is supported by min-count={min_count} vectors")
        order = np.argsort(-counts[j], kind="stable")
        donors = order[: int((~small).sum())]
        out[j, small] = centroids[j, np.resize(donors, int(small.sum()))]
    return out
