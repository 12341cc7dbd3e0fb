"""Exact re-ranking stays local: a shard re-ranks its compressed candidates on its raw
vectors and answers with their exact order, never an exact distance."""

from __future__ import annotations

import numpy as np
import pytest

from fed_app.experiment import SearchRequest
from fed_app import shard_store
from fed_app.lloyd import local_centroids
from fed_app.privacy.policy import ClientPolicy, Refusal
from vector_index.datasets import make_synthetic
from vector_index.quantizers import IndexSpec
from vector_index.store import Shard
from vector_index.topk import recall_report, rerank_exact

K = 10


@pytest.fixture(scope="module")
def pq_shard(tmp_path_factory):
    data = make_synthetic(num_base=2000, num_queries=50, dim=16, num_clusters=20, seed=3)
    books, _ = local_centroids(data.base, 4, 16, 10, 0)  # PQ 4x4: coarse codes, so re-ranking matters
    path = tmp_path_factory.mktemp("rerank") / "shard"
    shard = Shard.create(path, 16, IndexSpec("pq", m=4, nbits=4), codebooks={"pq": books})
    shard.add(data.base, np.arange(2000) + 100)
    shard.save()
    return path, data


def policy(**changes) -> ClientPolicy:
    return ClientPolicy.from_node_config({"shard-dir": "/unused"}).with_overrides(**changes)


def test_rerank_returns_exact_order_with_compressed_distances(pq_shard):
    path, data = pq_shard
    q = data.queries
    plain, _ = shard_store.search(path, q, SearchRequest(mode="search", k=K), policy(distance_grid=0.0))
    out, _ = shard_store.search(path, q, SearchRequest(mode="search", k=K, rerank=100), policy(distance_grid=0.0))
    shard = Shard.open(path)
    cand_d, cand_i = shard.search(q, 100)
    exact = ((shard.vectors(out["ids"].ravel()).reshape(*out["ids"].shape, 16) - q[:, None]) ** 2).sum(axis=2)
    assert (np.diff(exact, axis=1) >= -1e-5).all(), "ids are not in exact order"
    # every distance sent is a compressed distance of a candidate (the running maximum)
    assert np.isin(out["distances"], cand_d).all()
    assert (np.diff(out["distances"], axis=1) >= 0).all()
    assert not np.allclose(out["distances"], exact, atol=1e-3), "exact distances left the shard"
    # and the order is worth it: recall against exact search on the shard's raw vectors
    truth = np.argsort(((data.base[None] - q[:, None]) ** 2).sum(axis=2), axis=1)[:, :K] + 100
    better = recall_report(out["ids"], truth)["recall_10_at_10"]
    worse = recall_report(plain["ids"], truth)["recall_10_at_10"]
    assert better > worse + 0.1, (better, worse)


def test_rerank_beyond_max_k_is_refused():
    with pytest.raises(Refusal) as info:
        policy(max_k=50).check_candidates(51)
    assert info.value.limit == "max-k" and "rerank=51" in info.value.reason


def test_rerank_exact_keeps_padding_last():
    q = np.zeros((1, 2), dtype=np.float32)
    vectors = np.array([[[3, 0], [1, 0], [0, 0]]], dtype=np.float32)
    d, i = rerank_exact(q, vectors, np.array([[0.5, 0.7, np.float32(3.4e38)]], dtype=np.float32), np.array([[7, 8, -1]]), 3)
    assert i.tolist() == [[8, 7, -1]] and d[0, 0] == np.float32(0.7) and d[0, 1] == np.float32(0.7)
