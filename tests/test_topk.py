"""Merging per-shard top-k (vector_index.topk) equals one faiss index over the union."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from vector_index.topk import merge_topk, recall_1_at_r, recall_k_at_k, recall_report

D, NQ, K = 8, 40, 10


def shard_search(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    index = faiss.IndexIDMap(faiss.IndexFlatL2(D))
    index.add_with_ids(x, ids)
    return index.search(q, k)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, D)).astype(np.float32)
    q = rng.normal(size=(NQ, D)).astype(np.float32)
    return x, q


@pytest.mark.parametrize("sizes", [(300, 250, 150), (500, 3, 197), (4, 2, 694), (1, 1, 698)])
def test_merge_equals_single_flat_index(data, sizes):
    x, q = data
    perm = np.random.default_rng(1).permutation(x.shape[0])
    cuts = np.cumsum(sizes)[:-1]
    dists, idss = [], []
    for rows in np.split(perm, cuts):
        d, i = shard_search(np.ascontiguousarray(x[rows]), rows.astype(np.int64), q, K)
        dists.append(d)
        idss.append(i)
    if min(sizes) < K:  # a small shard pads with -1, as faiss does
        small = int(np.argmin(sizes))
        assert (idss[small][:, sizes[small]:] == -1).all()
    ref = faiss.IndexFlatL2(D)
    ref.add(x)
    d_ref, i_ref = ref.search(q, K)
    d, i = merge_topk(dists, idss, K)
    assert d.shape == i.shape == (NQ, K)
    assert i.dtype == np.int64
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
    assert (i >= 0).all()


def test_merge_when_union_has_fewer_than_k(data):
    x, q = data
    parts = [(x[:3], np.arange(3)), (x[3:5], np.arange(3, 5))]
    res = [shard_search(np.ascontiguousarray(p), ids.astype(np.int64), q, K) for p, ids in parts]
    d, i = merge_topk([r[0] for r in res], [r[1] for r in res], K)
    ref = faiss.IndexFlatL2(D)
    ref.add(np.ascontiguousarray(x[:5]))
    d_ref, i_ref = ref.search(q, K)
    np.testing.assert_array_equal(i[:, :5], i_ref[:, :5])
    np.testing.assert_allclose(d[:, :5], d_ref[:, :5], rtol=1e-5, atol=1e-6)
    assert (i[:, 5:] == -1).all()  # padding stays at the end, never outranks a real hit


def test_padding_never_outranks_real_results():
    # padded slots may carry any distance (faiss uses +inf or huge values, others 0)
    d1 = np.array([[0.0, 0.0, 0.0]], dtype=np.float32)
    i1 = np.array([[-1, -1, -1]])
    d2 = np.array([[5.0, 6.0, 7.0]], dtype=np.float32)
    i2 = np.array([[11, 12, 13]])
    d, i = merge_topk([d1, d2], [i1, i2], 3)
    np.testing.assert_array_equal(i, [[11, 12, 13]])
    np.testing.assert_array_equal(d, [[5.0, 6.0, 7.0]])


def test_merge_shards_with_different_k():
    d1 = np.array([[1.0, 4.0]], dtype=np.float32)
    i1 = np.array([[1, 4]])
    d2 = np.array([[2.0, 3.0, 5.0, 6.0]], dtype=np.float32)
    i2 = np.array([[2, 3, 5, 6]])
    d, i = merge_topk([d1, d2], [i1, i2], 4)
    np.testing.assert_array_equal(i, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(d, [[1.0, 2.0, 3.0, 4.0]])


def test_ties_are_ordered_by_id_whatever_the_shard_order():
    d1 = np.array([[1.0, 2.0]], dtype=np.float32)
    d2 = np.array([[1.0, 2.0]], dtype=np.float32)
    a = merge_topk([d1, d2], [np.array([[7, 1]]), np.array([[3, 9]])], 3)
    b = merge_topk([d2, d1], [np.array([[3, 9]]), np.array([[7, 1]])], 3)
    np.testing.assert_array_equal(a[1], [[3, 7, 1]])
    np.testing.assert_array_equal(b[1], a[1])


def test_recall_1_at_r_hand_made():
    truth = np.array([[5, 1, 2], [7, 8, 9], [0, 3, 4], [6, 6, 6]])
    found = np.array([[5, 0, 0], [1, 7, 0], [1, 2, 3], [-1, -1, -1]])
    assert recall_1_at_r(found, truth, 1) == pytest.approx(1 / 4)  # only query 0
    assert recall_1_at_r(found, truth, 2) == pytest.approx(2 / 4)  # + query 1
    assert recall_1_at_r(found, truth, 3) == pytest.approx(2 / 4)  # query 2's 0 never found
    # a query with no true neighbour at all is never a hit for a padded answer
    assert recall_1_at_r(np.array([[-1, -1]]), np.array([[-1, -1]]), 2) == 0.0


def test_recall_k_at_k_hand_made():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_k_at_k(found, truth, 4) == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert recall_k_at_k(found, truth, 2) == pytest.approx((0 / 2 + 2 / 2) / 2)
    # padding ids must not count as hits even if both sides pad
    pad_t = np.array([[1, -1]])
    pad_f = np.array([[2, -1]])
    assert recall_k_at_k(pad_f, pad_t, 2) == 0.0


def test_recall_report_perfect_and_keys():
    truth = np.tile(np.arange(10), (3, 1))
    rep = recall_report(truth.copy(), truth)
    assert rep == {"recall_1_at_1": 1.0, "recall_1_at_10": 1.0, "recall_10_at_10": 1.0}
    rev = truth[:, ::-1].copy()
    rep = recall_report(rev, truth)
    assert rep["recall_1_at_1"] == 0.0
    assert rep["recall_1_at_10"] == 1.0
    assert rep["recall_10_at_10"] == 1.0
