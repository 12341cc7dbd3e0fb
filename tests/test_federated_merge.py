"""Merging per-shard answers equals one faiss index over the union of the shards."""

from __future__ import annotations

import faiss
import numpy as np

from fed_app.federated_search import merge_qualified, merge_ranges


def _shards(seed: int = 0):
    rs = np.random.RandomState(seed)
    sizes = [300, 7, 120]  # one shard smaller than k
    xs = [rs.rand(n, 8).astype(np.float32) for n in sizes]
    ids = [np.arange(n, dtype=np.int64) for n in sizes]  # ids clash across shards
    return xs, ids, rs.rand(25, 8).astype(np.float32)


def _shard_indexes(xs, ids) -> list[faiss.Index]:
    out = []
    for x, i in zip(xs, ids):
        index = faiss.IndexIDMap(faiss.IndexFlatL2(x.shape[1]))
        index.add_with_ids(x, i)
        out.append(index)
    return out


def test_topk_merge_equals_single_index_with_node_qualified_ids() -> None:
    xs, ids, q = _shards()
    nodes = [11, 2**63 + 5, 2**64 - 1]  # Flower node ids are unsigned 64-bit
    k = 10
    per = [index.search(q, k) for index in _shard_indexes(xs, ids)]
    d, i, n = merge_qualified(nodes, [p[0] for p in per], [p[1] for p in per], k)

    union = faiss.IndexFlatL2(8)
    union.add(np.concatenate(xs))
    owner = np.concatenate([np.full(len(x), node, dtype=np.uint64) for x, node in zip(xs, nodes)])
    local = np.concatenate(ids)
    du, iu = union.search(q, k)
    np.testing.assert_allclose(d, du, rtol=1e-5)
    assert (n == owner[iu]).all() and (i == local[iu]).all()


def test_range_merge_equals_brute_force_within_radius() -> None:
    xs, ids, q = _shards(1)
    nodes = [5, 2**63 + 6, 7]
    radius = 0.35
    parts = [index.range_search(q, radius) for index in _shard_indexes(xs, ids)]
    lims, d, i, n = merge_ranges(nodes, parts)

    allx = np.concatenate(xs)
    owner = np.concatenate([np.full(len(x), node, dtype=np.uint64) for x, node in zip(xs, nodes)])
    local = np.concatenate(ids)
    dist = ((q[:, None, :] - allx[None]) ** 2).sum(-1)
    assert lims.size == q.shape[0] + 1 and lims[-1] > 0
    for j in range(q.shape[0]):
        hit = np.flatnonzero(dist[j] < radius)
        got = sorted(zip(n[lims[j] : lims[j + 1]].tolist(), i[lims[j] : lims[j + 1]].tolist()))
        assert got == sorted(zip(owner[hit].tolist(), local[hit].tolist()))
        assert np.all(np.diff(d[lims[j] : lims[j + 1]]) >= 0)
