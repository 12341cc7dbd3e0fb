"""Merging per-shard top-k lists and scoring them against ground truth."""

from __future__ import annotations

import numpy as np


def merge_topk(distances: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k from per-shard top-k lists (each [nq, k_i], smaller distance first).

    Shards holding fewer than k vectors pad with id -1; those slots sort last. Equal
    distances (frequent with PQ codes) are ordered by id, so the answer does not depend
    on the order in which shards replied.
    """
    d = np.concatenate(distances, axis=1).astype(np.float32)
    i = np.concatenate(ids, axis=1).astype(np.int64)
    d = np.where(i < 0, np.inf, d)
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), d), axis=1)[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def rerank_exact(queries: np.ndarray, vectors: np.ndarray, distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidates by their exact distance, but answer with the candidates' own
    (compressed) distances: only the exact *order* leaves the shard.

    ``vectors[q, j]`` is candidate ``ids[q, j]``'s raw vector (``ids`` -1: padding). The
    returned distances are made non-decreasing along the exact order (running maximum),
    so a merge over shards that sorts by distance keeps each shard's order.
    """
    exact = ((vectors - queries[:, None, :].astype(np.float32)) ** 2).sum(axis=2)
    exact = np.where(ids < 0, np.inf, exact)
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(ids, order, axis=1)
    out_d = np.maximum.accumulate(np.take_along_axis(distances, order, axis=1), axis=1)
    return out_d, out_ids


def recall_1_at_r(found: np.ndarray, truth: np.ndarray, r: int) -> float:
    """Fraction of queries whose true nearest neighbour is in the first r results."""
    return float(((found[:, :r] == truth[:, :1]) & (truth[:, :1] >= 0)).any(axis=1).mean())


def recall_k_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean overlap of the first k results with the true first k, divided by k.

    Padding ids (-1) are not neighbours: a padded slot never counts as a hit.
    """
    hits = [np.intersect1d(f[:k][f[:k] >= 0], t[:k]).size for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def recall_report(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {
        "recall_1_at_1": recall_1_at_r(found, truth, 1),
        "recall_1_at_10": recall_1_at_r(found, truth, 10),
        "recall_10_at_10": recall_k_at_k(found, truth, 10),
    }
