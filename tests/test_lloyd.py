"""Federated Lloyd maths (fed_app.lloyd) against faiss as the oracle."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from fed_app.lloyd import (
    local_centroids,
    lloyd_statistics,
    lloyd_update,
    weighted_merge,
)
from vector_index.quantizers import split_subspaces

N, D, M, K = 3000, 16, 4, 16
DSUB = D // M


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, D)).astype(np.float32)
    labels = rng.integers(10, size=N)
    return (centres[labels] + 0.5 * rng.normal(size=(N, D))).astype(np.float32)


@pytest.fixture(scope="module")
def start(data) -> np.ndarray:
    """A shared start codebook: K distinct data sub-vectors per sub-space."""
    rng = np.random.default_rng(1)
    rows = rng.choice(N, size=K, replace=False)
    return np.ascontiguousarray(split_subspaces(data[rows], M).astype(np.float32))  # [M, K, dsub]


def shards_of(x: np.ndarray) -> list[np.ndarray]:
    perm = np.random.default_rng(2).permutation(x.shape[0])
    cuts = [200, 1100]  # uneven: 200, 900, 1900
    return [np.ascontiguousarray(x[p]) for p in np.split(perm, cuts)]


def federated_step(x: np.ndarray, codebook: np.ndarray, empty: str = "keep"):
    stats = [lloyd_statistics(s, codebook) for s in shards_of(x)]
    sums = sum(s[0] for s in stats)
    counts = sum(s[1] for s in stats)
    sse = sum(s[2] for s in stats)
    new, n_empty = lloyd_update(sums, counts, codebook, empty, seed=0)
    return new, counts, sse, n_empty


def faiss_one_step(sub: np.ndarray, init: np.ndarray) -> np.ndarray:
    km = faiss.Kmeans(sub.shape[1], init.shape[0], niter=1, verbose=False)
    km.cp.max_points_per_centroid = 10**7  # no sub-sampling
    km.cp.min_points_per_centroid = 1
    km.train(sub, init_centroids=np.ascontiguousarray(init))
    return km.centroids


def test_shards_are_uneven_and_cover_data(data):
    sizes = [s.shape[0] for s in shards_of(data)]
    assert sizes == [200, 900, 1900]


def test_federated_step_equals_faiss_centralized_step(data, start):
    new, counts, _, n_empty = federated_step(data, start)
    assert new.shape == (M, K, DSUB) and new.dtype == np.float32
    assert n_empty == 0  # starts are data points: every centroid gets its own point
    assert not np.allclose(new, start)  # the step actually moved something
    for j, sub in enumerate(split_subspaces(data, M)):
        oracle = faiss_one_step(sub, start[j])
        np.testing.assert_allclose(new[j], oracle, rtol=1e-5, atol=1e-5)


def test_federated_counts_equal_faiss_assignment(data, start):
    _, counts, sse, _ = federated_step(data, start)
    assert counts.shape == (M, K)
    assert (counts.sum(axis=1) == N).all()
    total = 0.0
    for j, sub in enumerate(split_subspaces(data, M)):
        index = faiss.IndexFlatL2(DSUB)
        index.add(np.ascontiguousarray(start[j]))
        dist, assign = index.search(sub, 1)
        np.testing.assert_array_equal(counts[j], np.bincount(assign.ravel(), minlength=K))
        total += float(dist.sum())
    assert sse == pytest.approx(total, rel=1e-5)


def test_federated_equals_statistics_on_union(data, start):
    new, counts, sse, _ = federated_step(data, start)
    sums_u, counts_u, sse_u = lloyd_statistics(data, start)
    new_u, _ = lloyd_update(sums_u, counts_u, start, "keep", seed=0)
    np.testing.assert_array_equal(counts, counts_u)
    np.testing.assert_allclose(new, new_u, rtol=1e-5, atol=1e-6)
    assert sse == pytest.approx(sse_u, rel=1e-6)


def test_update_rejects_unknown_empty_policy(data, start):
    sums, counts, _ = lloyd_statistics(data, start)
    with pytest.raises(ValueError, match="empty='drop'"):
        lloyd_update(sums, counts, start, "drop", seed=0)


@pytest.fixture(scope="module")
def start_with_far_centroid(start) -> np.ndarray:
    far = start.copy()
    far[:, 3] = 1e4  # centroid 3 is far from every sub-vector, in every sub-space
    return far


def test_far_centroid_is_empty_and_kept(data, start_with_far_centroid):
    cb = start_with_far_centroid
    new, counts, _, n_empty = federated_step(data, cb, empty="keep")
    assert (counts[:, 3] == 0).all()
    assert n_empty == M  # one empty centroid per sub-space
    np.testing.assert_array_equal(new[:, 3], cb[:, 3])  # left where it was
    assert np.isfinite(new).all()


def test_far_centroid_is_split_like_faiss(data, start_with_far_centroid):
    cb = start_with_far_centroid
    new, counts, _, n_empty = federated_step(data, cb, empty="split")
    keep, _, _, _ = federated_step(data, cb, empty="keep")
    assert n_empty == M  # reported, even though it was then reassigned
    assert np.isfinite(new).all()
    assert (np.abs(new[:, 3]) < 100).all()  # moved next to the data
    # faiss's reassign_centroids: empty centroid = c * fac, donor = c / fac
    fac = np.ones(DSUB, dtype=np.float32)
    fac[::2] += 1 / 1024.0
    fac[1::2] -= 1 / 1024.0
    for j in range(M):
        donors = [
            i for i in range(K)
            if i != 3
            and np.allclose(new[j, 3], keep[j, i] * fac, rtol=1e-6, atol=1e-7)
            and np.allclose(new[j, i], keep[j, i] / fac, rtol=1e-6, atol=1e-7)
        ]
        assert len(donors) == 1, f"sub-space {j}: the empty centroid was not split from one cluster"
        assert counts[j, donors[0]] >= 2
        others = [i for i in range(K) if i not in (3, donors[0])]
        np.testing.assert_array_equal(new[j, others], keep[j, others])


def test_split_is_deterministic_under_seed(data, start_with_far_centroid):
    cb = start_with_far_centroid
    sums, counts, _ = lloyd_statistics(data, cb)
    a, _ = lloyd_update(sums, counts, cb, "split", seed=5)
    b, _ = lloyd_update(sums, counts, cb, "split", seed=5)
    np.testing.assert_array_equal(a, b)


def test_update_does_not_modify_inputs(data, start_with_far_centroid):
    cb = start_with_far_centroid
    sums, counts, _ = lloyd_statistics(data, cb)
    cb0, counts0 = cb.copy(), counts.copy()
    lloyd_update(sums, counts, cb, "split", seed=0)
    np.testing.assert_array_equal(cb, cb0)
    np.testing.assert_array_equal(counts, counts0)


def test_tiny_client_contributes_statistics(data, start):
    x = np.ascontiguousarray(data[:5])
    sums, counts, sse = lloyd_statistics(x, start)
    assert (counts.sum(axis=1) == 5).all()
    # the sums of all centroids add back up to the sub-vectors' totals
    np.testing.assert_allclose(sums.sum(axis=1), split_subspaces(x, M).sum(axis=1), rtol=1e-5, atol=1e-5)
    assert sse > 0


def test_tiny_client_local_centroids(data):
    x = np.ascontiguousarray(data[:5])
    cents, counts = local_centroids(x, M, K, niter=5, seed=0)
    assert cents.shape == (M, 5, DSUB)
    assert counts.shape == (M, 5)
    assert (counts.sum(axis=1) == 5).all()
    np.testing.assert_array_equal(cents, split_subspaces(x, M))


def test_local_centroids_on_a_normal_client(data):
    x = np.ascontiguousarray(data[:600])
    cents, counts = local_centroids(x, M, K, niter=5, seed=0)
    assert cents.shape == (M, K, DSUB)
    assert (counts.sum(axis=1) == 600).all()
    # counts are the nearest-centroid assignment of the client's sub-vectors
    for j, sub in enumerate(split_subspaces(x, M)):
        index = faiss.IndexFlatL2(DSUB)
        index.add(np.ascontiguousarray(cents[j]))
        np.testing.assert_array_equal(counts[j], np.bincount(index.search(sub, 1)[1].ravel(), minlength=K))


def test_weighted_merge_shape_and_determinism(data):
    parts = [local_centroids(np.ascontiguousarray(s), M, 32, niter=5, seed=i) for i, s in enumerate(shards_of(data))]
    cents = [p[0] for p in parts]
    counts = [p[1] for p in parts]
    a = weighted_merge(cents, counts, K, niter=10, seed=3)
    b = weighted_merge(cents, counts, K, niter=10, seed=3)
    c = weighted_merge(cents, counts, K, niter=10, seed=4)
    assert a.shape == (M, K, DSUB) and a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # a sensible init: better than the starting codebook of random data points
    rng = np.random.default_rng(9)
    rand = split_subspaces(data[rng.choice(N, K, replace=False)], M)
    assert lloyd_statistics(data, a)[2] < lloyd_statistics(data, rand)[2]


def test_weighted_merge_uses_weights():
    # two sub-space points: one heavy, one light; K=1 must land near the heavy one
    cents = [np.array([[[0.0, 0.0]], [[0.0, 0.0]]], dtype=np.float32),
             np.array([[[10.0, 10.0]], [[10.0, 10.0]]], dtype=np.float32)]
    counts = [np.array([[99], [99]]), np.array([[1], [1]])]
    out = weighted_merge(cents, counts, 1, niter=5, seed=0)
    np.testing.assert_allclose(out[:, 0], np.full((2, 2), 0.1), atol=1e-4)


def test_weighted_merge_refuses_too_few_centroids():
    cents = [np.zeros((2, 3, 4), dtype=np.float32)]
    counts = [np.ones((2, 3), dtype=np.int64)]
    with pytest.raises(ValueError, match="needs K=16"):
        weighted_merge(cents, counts, 16, niter=5, seed=0)
