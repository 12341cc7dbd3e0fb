"""Partitioners (vector_index.partition): deterministic, exhaustive, skewed when asked."""

from __future__ import annotations

import numpy as np
import pytest

from vector_index.partition import by_cluster, cluster_labels, dirichlet, iid
from vector_index.validation import VectorError

N, D, CLIENTS, CLUSTERS = 1200, 8, 6, 10


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = 5 * rng.normal(size=(CLUSTERS, D)).astype(np.float32)
    labels = rng.integers(CLUSTERS, size=N)
    return (centres[labels] + 0.3 * rng.normal(size=(N, D))).astype(np.float32)


PARTITIONERS = {
    "iid": lambda x, n, seed: iid(x, n, seed),
    "dirichlet": lambda x, n, seed: dirichlet(x, n, 0.5, CLUSTERS, seed),
    "by_cluster": lambda x, n, seed: by_cluster(x, n, seed),
}


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_covers_every_vector_exactly_once(x, name):
    parts = PARTITIONERS[name](x, CLIENTS, 0)
    assert len(parts) == CLIENTS
    assert all(p.dtype == np.int64 for p in parts)
    assert all(p.size >= 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(N))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_deterministic_under_seed(x, name):
    a = PARTITIONERS[name](x, CLIENTS, 0)
    b = PARTITIONERS[name](x, CLIENTS, 0)
    c = PARTITIONERS[name](x, CLIENTS, 1)
    assert same(a, b)
    assert not same(a, c)


def label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean entropy (nats) of the cluster-label histogram inside each client."""
    out = []
    for p in parts:
        h = np.bincount(labels[p], minlength=CLUSTERS).astype(float)
        h = h[h > 0] / h.sum()
        out.append(float(-(h * np.log(h)).sum()))
    return float(np.mean(out))


def test_dirichlet_small_alpha_is_skewed(x):
    labels = cluster_labels(x, CLUSTERS, 0)
    e_iid = label_entropy(iid(x, CLIENTS, 0), labels)
    e_dir = label_entropy(dirichlet(x, CLIENTS, 0.1, CLUSTERS, 0), labels)
    e_big = label_entropy(dirichlet(x, CLIENTS, 100.0, CLUSTERS, 0), labels)
    e_all = label_entropy([np.arange(N)], labels)
    assert e_iid > 0.95 * e_all  # iid clients look like the whole data set
    assert e_dir < 0.6 * e_iid
    assert e_big > e_dir


def test_by_cluster_gives_each_client_one_cluster(x):
    parts = by_cluster(x, CLIENTS, 0)
    labels = cluster_labels(x, CLIENTS, 0)
    for k, p in enumerate(parts):
        assert (labels[p] == k).all()


def test_iid_shards_are_balanced(x):
    sizes = [p.size for p in iid(x, 7, 0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_never_leaves_a_client_empty(x):
    parts = dirichlet(x, 40, 0.01, CLUSTERS, 0)
    assert all(p.size >= 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(N))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_more_clients_than_vectors_is_refused(x, name):
    small = np.ascontiguousarray(x[:5])
    with pytest.raises(VectorError, match=r"num_clients=6 exceeds the 5 base vectors"):
        PARTITIONERS[name](small, 6, 0)


@pytest.mark.parametrize("name", PARTITIONERS)
def test_zero_clients_is_refused(x, name):
    with pytest.raises(VectorError, match=r"num_clients=0 must be >= 1"):
        PARTITIONERS[name](x, 0, 0)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_non_positive_alpha_is_refused(x, alpha):
    with pytest.raises(VectorError, match="alpha"):
        dirichlet(x, CLIENTS, alpha, CLUSTERS, 0)
