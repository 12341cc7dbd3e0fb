"""Unit tests of what a client enforces on what leaves it (issue 9), without Flower
simulations: the limits (ClientPolicy), the min-count release rules, the client tasks
on real faiss, the ClientApp's refusal/withheld replies, shard search and config checks.

Where a test shows a protection holds, it also shows (with the protection off) that the
same setup does leak, so the assertion can fail.
"""

from __future__ import annotations

import copy
import re
import time
from functools import lru_cache

import faiss
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from omegaconf import OmegaConf

from fed_app import client_tasks, shard_store
from fed_app.client_app import make_client_app
from fed_app.config import ConfigError, compose_config, load_experiment, validate
from fed_app.experiment import ClientView, SearchRequest
from fed_app.encoder import encode, initial_weights, load_encoder
from fed_app.lloyd import local_centroids
from fed_app.privacy import release
from fed_app.privacy.policy import DEFAULTS_FILE, ClientPolicy, Refusal, round_significant
from fed_app.privacy.release import Withheld
from fed_app.settings import client_config, client_view
from fed_app.state import GlobalState, encoder_record
from vector_index.quantizers import IndexSpec, split_subspaces
from vector_index.store import Shard

D = 16
M, NBITS = 4, 4  # PQ 4x4: codebooks [4, 16, 4]
SMALL = ["data=synthetic", f"index.m={M}", f"index.nbits={NBITS}", "init.local_k=64"]
DEFAULTS = OmegaConf.to_container(OmegaConf.load(DEFAULTS_FILE))
FLT_MAX = float(np.finfo(np.float32).max)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


@lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> dict:
    return compose_config(list(overrides))


def composed(*overrides: str) -> dict:
    """A fresh (mutable) copy of a composed config; Hydra composes each variant once."""
    return copy.deepcopy(_composed(tuple(overrides)))


def small_cfg(**changes) -> ClientView:
    """What a client receives in round 1 for SMALL with ``changes`` (``init__local_k=3``)."""
    cfg = composed(*SMALL)
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return client_view(load_experiment(cfg), **{"server-round": 1})


def unchecked(view: ClientView, section: str, **values) -> ClientView:
    """``view`` with values the schema refuses on arrival: what the client tasks do if a
    hostile value got past the message check (defence in depth)."""
    return view.model_copy(update={section: getattr(view, section).model_copy(update=values)})


def policy(**changes) -> ClientPolicy:
    return ClientPolicy.from_node_config({}).with_overrides(**changes)


def clustered(n: int, seed: int = 0, clusters: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, D))
    return (centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, D))).astype(np.float32)


def with_outlier(x: np.ndarray, far: float = 1000.0) -> np.ndarray:
    """x plus one vector far from everything: k-means / Lloyd leave it alone in its cell."""
    out = np.full((1, x.shape[1]), far, dtype=np.float32)
    out[0, ::2] = -far
    return np.concatenate([x, out])


def raw_rows_released(released: np.ndarray, z: np.ndarray, tol: float = 1e-6, ignore: np.ndarray | None = None) -> int:
    """How many released rows [M, K, dsub] equal (within tol) one of the shard's
    sub-vectors in the same sub-space; rows equal to ``ignore`` (what the server itself
    sent) are not counted."""
    subs = split_subspaces(np.ascontiguousarray(z, dtype=np.float32), released.shape[0])
    hits = 0
    for j in range(released.shape[0]):
        rows = released[j].astype(np.float64)
        d = ((rows[:, None, :] - subs[j][None].astype(np.float64)) ** 2).sum(-1).min(axis=1)
        leak = d <= tol**2
        if ignore is not None:
            leak &= np.abs(released[j] - ignore[j]).max(axis=1) > tol
        hits += int(leak.sum())
    return hits


def identity_state(codebooks: dict | None = None) -> GlobalState:
    return GlobalState(encoder=initial_weights(D, "rotation"), codebooks=dict(codebooks or {}))


def encoded(x: np.ndarray) -> np.ndarray:
    return encode(load_encoder(initial_weights(D, "rotation")), x)


# ================================================================ 1. node config


def test_node_defaults_equal_the_shipped_defaults_file():
    p = ClientPolicy.from_node_config({})
    assert DEFAULTS["min_count"] >= 5
    for name in ("min_count", "max_k", "max_range_results", "query_budget", "distance_grid", "examples_digits"):
        assert getattr(p, name) == DEFAULTS[name], name
    assert p.source == "node defaults (conf/privacy/secure.yaml)"
    assert p.allow_trusted_eval is True  # no shard-dir: a simulated node


def test_node_config_keys_with_dashes_override():
    nc = {"max-k": 7, "min-count": 9, "max-range-results": 11, "query-budget": 13, "distance-grid": 0.5, "examples-digits": 3}
    p = ClientPolicy.from_node_config(nc)
    assert (p.max_k, p.min_count, p.max_range_results, p.query_budget, p.distance_grid, p.examples_digits) == (7, 9, 11, 13, 0.5, 3)
    assert p.source.startswith("node config")
    for key in nc:
        assert key in p.source


def test_partial_node_config_keeps_defaults_for_the_rest():
    p = ClientPolicy.from_node_config({"max-k": 42, "partition-id": 0, "num-partitions": 3})
    assert p.max_k == 42 and p.min_count == DEFAULTS["min_count"] and p.query_budget == DEFAULTS["query_budget"]
    assert p.source == "node config (max-k)"


def test_underscore_spelling_is_not_a_node_key():
    # node keys are spelled with '-'; 'max_k' is not read (and so cannot loosen max-k)
    assert ClientPolicy.from_node_config({"max_k": 10**9}).max_k == DEFAULTS["max_k"]


def test_int_distance_grid_accepted_as_float():
    p = ClientPolicy.from_node_config({"distance-grid": 2})
    assert p.distance_grid == 2.0 and isinstance(p.distance_grid, float)
    assert ClientPolicy.from_node_config({"distance-grid": 0}).distance_grid == 0.0


@pytest.mark.parametrize("key", ["max-k", "min-count", "max-range-results", "query-budget"])
@pytest.mark.parametrize("bad", [0, -1, "abc", True, 1.5, None])
def test_bad_int_limits_name_the_node_key(key, bad):
    with pytest.raises(ValueError, match=rf"^{key}: must be an integer >= 1"):
        ClientPolicy.from_node_config({key: bad})


@pytest.mark.parametrize("bad", [-1, "abc", True, 1.5])
def test_bad_examples_digits_names_the_node_key(bad):
    with pytest.raises(ValueError, match=r"^examples-digits: must be an integer >= 0"):
        ClientPolicy.from_node_config({"examples-digits": bad})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -0.1, -1, "abc", True, "0.1"])
def test_bad_distance_grid_names_the_node_key(bad):
    with pytest.raises(ValueError, match=r"^distance-grid: must be a number >= 0"):
        ClientPolicy.from_node_config({"distance-grid": bad})


def test_trusted_eval_only_without_shard_dir():
    assert ClientPolicy.from_node_config({"partition-id": 0}).allow_trusted_eval is True
    assert ClientPolicy.from_node_config({"shard-dir": "/somewhere"}).allow_trusted_eval is False
    assert ClientPolicy.from_node_config({"shard-dir": "/somewhere", "max-k": 5}).allow_trusted_eval is False


def test_as_record_reports_the_limits_with_node_keys():
    rec = ClientPolicy.from_node_config({"max-k": 7, "shard-dir": "/x"}).as_record()
    assert rec["max-k"] == 7 and rec["min-count"] == DEFAULTS["min_count"]
    assert rec["allow-trusted-eval"] == 0 and isinstance(rec["allow-trusted-eval"], int)
    ConfigRecord(rec)  # sendable as is


# ================================================================ 2. simulation policy


def test_for_simulation_default_privacy():
    p = ClientPolicy.for_simulation(load_experiment(composed(*SMALL)))
    for name in ("min_count", "max_k", "max_range_results", "query_budget", "distance_grid", "examples_digits"):
        assert getattr(p, name) == DEFAULTS[name], name
    assert p.allow_trusted_eval is False
    assert "simulator" in p.source and "secure" in p.source


def test_for_simulation_privacy_off():
    p = ClientPolicy.for_simulation(load_experiment(composed(*SMALL, "privacy=off")))
    assert p.min_count == 1 and p.distance_grid == 0.0 and p.examples_digits == 0 and p.max_k >= 10**9
    assert p.allow_trusted_eval is False  # privacy=off alone does not switch the protocol
    assert "off" in p.source


@pytest.mark.parametrize("privacy", ["secure", "trusted", "off"])
def test_for_simulation_trusted_only_with_trusted_protocol(privacy):
    cfg = composed(*SMALL, f"privacy={privacy}")
    for protocol, allowed in (("trusted", True), ("private", False)):
        cfg["eval"]["protocol"] = protocol
        assert ClientPolicy.for_simulation(load_experiment(cfg)).allow_trusted_eval is allowed, protocol


def test_for_simulation_bad_group_value_names_the_config_key():
    cfg = composed(*SMALL)
    cfg["privacy"]["max_k"] = 0
    with pytest.raises(ValueError, match=r"^privacy\.max_k: must be an integer >= 1"):
        ClientPolicy.for_simulation(load_experiment(cfg))


# ================================================================ 3. checks and rounding


def test_check_k():
    p = policy(max_k=20)
    p.check_k(20)
    with pytest.raises(Refusal) as info:
        p.check_k(21)
    assert info.value.limit == "max-k" and "max-k=20" in info.value.reason and "21" in info.value.reason
    assert str(info.value) == info.value.reason


def test_check_range():
    p = policy(max_range_results=3)
    p.check_range(np.array([0, 3, 3, 6]))  # 3, 0, 3 results: fine
    p.check_range(np.array([0]))  # no queries
    with pytest.raises(Refusal) as info:
        p.check_range(np.array([0, 2, 6, 7]))  # query 1 returns 4
    assert info.value.limit == "max-range-results"
    assert "max-range-results=3" in info.value.reason and "4 results" in info.value.reason and "query 1" in info.value.reason


def test_spend():
    p = policy(query_budget=10)
    assert p.spend(0, 4) == 4
    assert p.spend(4, 6) == 10
    with pytest.raises(Refusal) as info:
        p.spend(10, 1)
    assert info.value.limit == "query-budget" and "query-budget=10" in info.value.reason
    with pytest.raises(Refusal):
        p.spend(0, 11)  # one request beyond the budget is refused whole


def test_round_distances_on_grid():
    p = policy(distance_grid=0.25)
    d = np.array([[0.1, 0.13, 0.374, 1.0, 7.6]], dtype=np.float32)
    before = d.copy()
    out = p.round_distances(d)
    assert out.dtype == np.float32 and out.shape == d.shape
    np.testing.assert_array_equal(out, np.array([[0.0, 0.25, 0.25, 1.0, 7.5]], dtype=np.float32))
    np.testing.assert_array_equal(d, before)  # input untouched


def test_round_distances_fine_grid_bound():
    p = policy(distance_grid=0.001)
    d = np.random.default_rng(0).uniform(0, 50, size=(20, 10)).astype(np.float32)
    out = p.round_distances(d)
    assert np.abs(out.astype(np.float64) - d).max() <= 0.0005 + 1e-5
    steps = out.astype(np.float64) / 0.001
    assert np.abs(steps - np.round(steps)).max() < 0.02


def test_round_distances_leaves_inf_padding_alone():
    p = policy(distance_grid=0.01)
    d = np.array([[0.123, np.inf], [np.inf, np.inf]], dtype=np.float32)
    out = p.round_distances(d)
    assert out[0, 0] == np.float32(0.12)
    assert np.isposinf(out[0, 1]) and np.isposinf(out[1]).all()


def test_round_distances_leaves_faiss_padding_alone():
    """faiss pads missing results (k > shard size) with FLT_MAX (finite) and id -1."""
    index = faiss.IndexFlatL2(4)
    index.add(np.eye(4, dtype=np.float32)[:3])
    d, i = index.search(np.zeros((1, 4), np.float32), 5)
    assert (i[0, 3:] == -1).all() and (d[0, 3:] == FLT_MAX).all()  # what faiss pads with
    out = policy(distance_grid=0.001).round_distances(d)
    np.testing.assert_array_equal(out[0, :3], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(out[0, 3:], d[0, 3:])  # "padding stays as it was"


def test_grid_zero_leaves_distances_unchanged():
    d = np.random.default_rng(1).uniform(0, 3, size=(4, 5)).astype(np.float32)
    np.testing.assert_array_equal(policy(distance_grid=0.0).round_distances(d), d)


def test_round_significant_two_digits():
    out = round_significant(np.array([1234.0, 7.0, 0.0, 99.0, 1250.0, 98765.0, 5.0]), 2)
    np.testing.assert_array_equal(out, [1200.0, 7.0, 0.0, 99.0, 1200.0, 99000.0, 5.0])
    x = np.array([1234.0, 7.0, 0.0])
    np.testing.assert_array_equal(round_significant(x, 0), x)


def test_round_examples_and_counts():
    p = policy(examples_digits=2)
    assert p.round_examples(1234) == 1200.0 and p.round_examples(7) == 7.0 and p.round_examples(0) == 0.0
    assert policy(examples_digits=0).round_examples(1234) == 1234.0
    counts = p.round_counts(np.array([[5, 99, 101, 12345]]))
    np.testing.assert_array_equal(counts, [[5, 99, 100, 12000]])
    # integer counts stay integers after rounding (they are cast to int32 for the reply)
    c = np.arange(1, 5000)
    r = p.round_counts(c)
    assert (r.astype(np.int32) == np.round(r)).all() and (r >= np.minimum(c, 5)).all()


# ================================================================ 4. release


def test_init_k():
    with pytest.raises(Withheld, match=r"3 vector\(s\).*min-count=5"):
        release.init_k(3, 256, 5)
    assert release.init_k(12, 256, 5) == 2
    assert release.init_k(5, 256, 5) == 1
    assert release.init_k(100_000, 256, 5) == 256
    assert release.init_k(40, 64, 1) == 40  # min-count 1: as many as vectors
    release.check_shard_size(5, 5)
    with pytest.raises(Withheld, match="min-count=5"):
        release.check_shard_size(4, 5)


def test_supported_centroids_drops_small_and_pads():
    rng = np.random.default_rng(0)
    cents = rng.normal(size=(2, 4, 3)).astype(np.float32)
    counts = np.array([[9, 1, 5, 4], [0, 2, 3, 8]])
    out, oc = release.supported_centroids(cents, counts, 5)
    assert out.shape == (2, 2, 3) and oc.shape == (2, 2)
    np.testing.assert_array_equal(out[0], cents[0, [0, 2]])
    np.testing.assert_array_equal(oc[0], [9, 5])
    np.testing.assert_array_equal(out[1, 0], cents[1, 3])
    np.testing.assert_array_equal(oc[1], [8, 0])
    np.testing.assert_array_equal(out[1, 1], 0)  # padding row: zero, weight 0
    assert not ((oc > 0) & (oc < 5)).any()


def test_supported_centroids_none_supported():
    out, oc = release.supported_centroids(np.ones((2, 3, 2), np.float32), np.ones((2, 3), np.int64), 5)
    assert out.shape == (2, 1, 2) and (oc == 0).all() and (out == 0).all()


def test_suppress_small_cells():
    sums = np.arange(2 * 4 * 2, dtype=np.float64).reshape(2, 4, 2) + 1
    counts = np.array([[1, 5, 0, 4], [7, 2, 3, 10]])
    s, c, n = release.suppress_small_cells(sums, counts, 5)
    assert n == 4
    np.testing.assert_array_equal(c, [[0, 5, 0, 0], [7, 0, 0, 10]])
    assert (s[[0, 0, 1, 1], [0, 3, 1, 2]] == 0).all()  # the four small cells
    np.testing.assert_array_equal(s[0, 1], sums[0, 1])
    np.testing.assert_array_equal(s[1, 3], sums[1, 3])
    np.testing.assert_array_equal(s[0, 2], sums[0, 2])  # an empty cell is not "small": left as it was
    assert counts[0, 0] == 1 and sums[0, 0, 0] == 1  # inputs untouched
    s1, c1, n1 = release.suppress_small_cells(sums, counts, 1)
    assert n1 == 0 and (c1 == counts).all()


def test_keep_unsupported_at():
    prev = np.zeros((1, 3, 2), np.float32)
    refined = np.ones((1, 3, 2), np.float32) * np.array([1, 2, 3], np.float32)[None, :, None]
    out = release.keep_unsupported_at(prev, refined, np.array([[5, 4, 0]]), 5)
    np.testing.assert_array_equal(out[0], [[1, 1], [0, 0], [0, 0]])
    assert refined[0, 1, 0] == 2  # input untouched


def test_fill_unsupported_outputs_only_supported_rows():
    rng = np.random.default_rng(3)
    cents = rng.normal(size=(3, 8, 2)).astype(np.float32)
    counts = rng.integers(0, 12, size=(3, 8))
    counts[:, 0] = 20  # every sub-space has a supported centroid
    counts[1] = [20, 1, 1, 1, 1, 1, 1, 1]  # only one supported
    out = release.fill_unsupported(cents, counts, 5)
    assert out.shape == cents.shape
    for j in range(3):
        supported = cents[j, counts[j] >= 5]
        for row in out[j]:
            assert (np.abs(supported - row).max(axis=1) == 0).any()
        np.testing.assert_array_equal(out[j, counts[j] >= 5], supported)  # supported rows stay
    assert (out[1] == cents[1, 0]).all()


def test_fill_unsupported_withholds_when_a_subspace_has_none():
    counts = np.array([[9, 9], [4, 0]])
    with pytest.raises(Withheld, match="sub-space 1.*min-count=5"):
        release.fill_unsupported(np.zeros((2, 2, 2), np.float32), counts, 5)


# ================================================================ 5. client tasks (real faiss)


def sent_rows(out: dict) -> list[np.ndarray]:
    return [out["centroids"][j][out["counts"][j] > 0] for j in range(out["centroids"].shape[0])]


def test_init_centroids_sends_only_supported_centroids():
    x = clustered(300)
    out = client_tasks.init_centroids(identity_state(), x, "pq", small_cfg(), policy(min_count=5))
    assert out["counts"].dtype == np.int32 and out["centroids"].shape[0] == M
    c = out["counts"]
    assert not ((c > 0) & (c < 5)).any()
    per_subspace = (c > 0).sum(axis=1)
    assert (per_subspace >= 1).all() and (per_subspace <= 300 // 5).all()
    assert raw_rows_released(out["centroids"], encoded(x)) == 0


def test_init_centroids_outlier_cell_stays_home():
    x = with_outlier(clustered(300))
    z = encoded(x)
    out = client_tasks.init_centroids(identity_state(), x, "pq", small_cfg(), policy(min_count=5))
    assert raw_rows_released(out["centroids"], z) == 0
    assert all(np.abs(rows).max() < 100 for rows in sent_rows(out))  # nothing near the outlier
    # the same request without the min-count: the outlier is sent as a count-1 "centroid"
    leak = client_tasks.init_centroids(identity_state(), x, "pq", small_cfg(), policy(min_count=1))
    assert raw_rows_released(leak["centroids"], z[-1:]) == M


def test_init_centroids_small_shard_never_sends_its_vectors():
    x = clustered(40, seed=1)  # fewer vectors than init.local_k=64
    z = encoded(x)
    out = client_tasks.init_centroids(identity_state(), x, "pq", small_cfg(), policy(min_count=5))
    assert ((out["counts"] > 0).sum(axis=1) <= 40 // 5).all()
    assert not ((out["counts"] > 0) & (out["counts"] < 5)).any()
    assert raw_rows_released(out["centroids"], z) == 0
    # min-count 1: the leak min-count closes, every sub-vector sent bit-exact with count 1
    leak = client_tasks.init_centroids(identity_state(), x, "pq", small_cfg(), policy(min_count=1))
    assert leak["centroids"].shape == (M, 40, D // M) and (leak["counts"] == 1).all()
    np.testing.assert_array_equal(leak["centroids"], split_subspaces(z, M))


def test_init_centroids_tiny_shard_is_withheld():
    with pytest.raises(Withheld, match="min-count=5"):
        client_tasks.init_centroids(identity_state(), clustered(4), "pq", small_cfg(), policy(min_count=5))


@pytest.mark.parametrize("iters", [0, -1])
def test_init_centroids_server_chosen_kmeans_iters_cannot_expose_vectors(iters):
    """init.kmeans_iters comes from the server's message. With no iteration faiss's
    k-means returns its initial centroids, i.e. sampled raw sub-vectors, and their
    counts (>= min-count) pass the support check: they must still not leave."""
    x = clustered(300)
    with pytest.raises(ConfigError, match=r"^init\.kmeans_iters: must be >= 1"):
        small_cfg(init__kmeans_iters=iters)  # refused on arrival
    out = client_tasks.init_centroids(identity_state(), x, "pq", unchecked(small_cfg(), "init", kmeans_iters=iters), policy(min_count=5))
    assert not ((out["counts"] > 0) & (out["counts"] < 5)).any()
    assert raw_rows_released(out["centroids"], encoded(x)) == 0


def test_average_independent_server_chosen_kmeans_iters_cannot_expose_vectors():
    """The same server-chosen init.kmeans_iters=0 in the average_independent baseline."""
    z = encoded(clustered(300))
    cfg = unchecked(small_cfg(strategy__flower__codebook_update="average_independent"), "init", kmeans_iters=0)
    update, _ = client_tasks.codebook_update(z, {}, cfg.index.spec, cfg, policy(min_count=5))
    assert raw_rows_released(update["pq.centroids"], z) == 0


def books_near(z: np.ndarray, outlier_row: int, seed: int = 0) -> np.ndarray:
    """A server codebook of random centroids (none a raw sub-vector) whose centroid 0
    sits next to the outlier in every sub-space, so the outlier's cell has count 1."""
    rng = np.random.default_rng(seed)
    books = rng.normal(size=(M, 1 << NBITS, D // M)).astype(np.float32)
    books[:, 0] = split_subspaces(z, M)[:, outlier_row] + 0.5
    return books


def test_lloyd_update_releases_no_small_cell_and_exact_means():
    z = encoded(with_outlier(clustered(300)))
    books = books_near(z, -1)
    spec = small_cfg().index.spec
    update, withheld = client_tasks.codebook_update(z, {"pq": books}, spec, small_cfg(), policy(min_count=5))
    sums, counts = update["pq.sums"], update["pq.counts"]
    assert sums.dtype == np.float32 and counts.dtype == np.int32
    assert not ((counts > 0) & (counts < 5)).any()
    assert (counts[:, 0] == 0).all() and (sums[:, 0] == 0).all()  # the outlier's cell stayed home
    assert withheld >= M
    subs = split_subspaces(z, M)
    released = 0
    for j in range(M):
        assign = ((subs[j][:, None, :].astype(np.float64) - books[j][None]) ** 2).sum(-1).argmin(axis=1)
        for c in np.flatnonzero(counts[j]):
            members = subs[j][assign == c]
            assert counts[j, c] == len(members)
            np.testing.assert_allclose(sums[j, c] / counts[j, c], members.mean(axis=0), rtol=1e-4, atol=1e-4)
            released += 1
        # withheld = cells whose local count was 1..4
        small = np.bincount(assign, minlength=books.shape[1])
        assert ((small > 0) & (small < 5)).sum() == ((counts[j] == 0) & (small > 0)).sum()
    assert released > 0
    # min-count 1: the outlier's cell is sent, and its sum is the raw outlier sub-vector
    update1, w1 = client_tasks.codebook_update(z, {"pq": books}, spec, small_cfg(), policy(min_count=1))
    assert w1 == 0 and (update1["pq.counts"][:, 0] == 1).all()
    np.testing.assert_allclose(update1["pq.sums"][:, 0], split_subspaces(z, M)[:, -1], rtol=1e-6)


def test_average_refined_releases_no_raw_sub_vector():
    z = encoded(with_outlier(clustered(300)))
    books = books_near(z, -1)
    spec = small_cfg().index.spec
    cfg = small_cfg(strategy__flower__codebook_update="average_refined", strategy__flower__local_iters=5)
    update, withheld = client_tasks.codebook_update(z, {"pq": books}, spec, cfg, policy(min_count=5))
    cents = update["pq.centroids"]
    assert cents.shape == books.shape and withheld >= M
    assert raw_rows_released(cents, z) == 0
    np.testing.assert_array_equal(cents[:, 0], books[:, 0])  # the outlier's centroid stays where it was sent
    assert (np.abs(cents - books).max(axis=2) > 1e-3).any()  # supported centroids did move
    # without min-count the refined centroid 0 IS the outlier
    leak, _ = client_tasks.codebook_update(z, {"pq": books}, spec, cfg, policy(min_count=1))
    assert raw_rows_released(leak["pq.centroids"], z[-1:]) == M


def test_average_independent_releases_no_raw_sub_vector():
    z = encoded(with_outlier(clustered(300)))
    spec = small_cfg().index.spec
    cfg = small_cfg(strategy__flower__codebook_update="average_independent")
    update, withheld = client_tasks.codebook_update(z, {}, spec, cfg, policy(min_count=5))
    cents = update["pq.centroids"]
    assert cents.shape == (M, 1 << NBITS, D // M) and withheld == 0
    assert raw_rows_released(cents, z) == 0
    leak, _ = client_tasks.codebook_update(z, {}, spec, cfg, policy(min_count=1))
    assert raw_rows_released(leak["pq.centroids"], z[-1:]) == M  # the leak min-count closes


def test_average_independent_small_shard_withheld():
    z = encoded(clustered(12))  # fewer vectors than the 16 centroids per sub-space
    spec = small_cfg().index.spec
    cfg = small_cfg(strategy__flower__codebook_update="average_independent")
    with pytest.raises(Withheld, match="min-count=5"):
        client_tasks.codebook_update(z, {}, spec, cfg, policy(min_count=5))
    leak, _ = client_tasks.codebook_update(z, {}, spec, cfg, policy(min_count=1))
    assert raw_rows_released(leak["pq.centroids"], z) == M * 16  # every row a raw sub-vector


def test_train_local_codebooks_with_min_count():
    z = encoded(with_outlier(clustered(300)))
    spec = small_cfg().index.spec
    plain = client_tasks.train_local_codebooks(z, spec, 10, 0)
    guarded = client_tasks.train_local_codebooks(z, spec, 10, 0, min_count=5)
    assert raw_rows_released(plain["pq"], z[-1:]) == M
    assert raw_rows_released(guarded["pq"], z) == 0


def eval_state(x: np.ndarray) -> GlobalState:
    books, _ = local_centroids(encoded(x), M, 1 << NBITS, 10, 0)
    return identity_state({"pq": books})


def test_evaluate_reports_aggregates_only():
    x = clustered(1234)
    state = eval_state(x)
    ids = np.arange(1234, dtype=np.int64) + 10_000
    out = client_tasks.evaluate(state, x, ids, small_cfg(), policy(min_count=5, examples_digits=2))
    assert set(out) == {"num-examples", "distortion", "energy", "estimate.queries",
                        *(f"estimate.{k}" for k in client_tasks.ESTIMATE_KEYS)}
    assert out["num-examples"] == 1200.0
    assert out["estimate.queries"] == 200.0
    assert all(isinstance(v, float) for v in out.values())
    assert 0 < out["estimate.recall_10_at_10"] <= 1 and 0 <= out["estimate.recall_1_at_1"] <= 1
    # distortion: the mean squared PQ error of the shard under the global codebooks
    z = encoded(x)
    books = state.codebooks["pq"]
    sse = sum(((s[:, None, :].astype(np.float64) - books[j][None]) ** 2).sum(-1).min(axis=1).sum()
              for j, s in enumerate(split_subspaces(z, M)))
    assert out["distortion"] == pytest.approx(sse / 1234, rel=1e-4)
    assert out["energy"] == pytest.approx(float((z.astype(np.float64) ** 2).sum()) / 1234, rel=1e-5)


@pytest.mark.parametrize("n", [5, 9, 14])
def test_evaluate_small_shard_gives_no_estimate(n):
    cfg = small_cfg()
    assert n < cfg.eval.k + 5
    x = clustered(n, seed=n)
    out = client_tasks.evaluate(eval_state(clustered(300)), x, np.arange(n), cfg, policy(min_count=5))
    assert out["estimate.queries"] == 0.0
    assert all(out[f"estimate.{k}"] == 0.0 for k in client_tasks.ESTIMATE_KEYS)
    assert out["num-examples"] == float(n)


def test_evaluate_below_min_count_is_withheld():
    with pytest.raises(Withheld, match="min-count=5"):
        client_tasks.evaluate(eval_state(clustered(300)), clustered(4), np.arange(4), small_cfg(), policy(min_count=5))


# ================================================================ 6. shard search


@pytest.fixture(scope="module")
def shard_data():
    x = clustered(300, seed=7)
    ids = np.arange(300, dtype=np.int64) * 3 + 5
    books, _ = local_centroids(x, M, 1 << NBITS, 10, 0)
    return x, ids, books


def make_shard(path, kind: str, x, ids, books=None):
    if kind == "ivfflat":  # raw vectors in the lists of (here: local) coarse centroids
        spec = IndexSpec(kind, nlist=4, nprobe=2)
        coarse, _ = local_centroids(x, 1, 4, 10, 0)
        shard = Shard.create(path, D, spec, codebooks={"coarse": coarse})
        shard.add(x, ids)
        shard.save()
        return shard
    spec = IndexSpec(kind, m=M, nbits=NBITS)
    shard = Shard.create(path, D, spec, codebooks={"pq": books} if kind == "pq" else None)
    shard.add(x, ids)
    shard.save()
    return shard


@pytest.fixture(scope="module")
def pq_shard(tmp_path_factory, shard_data):
    x, ids, books = shard_data
    path = tmp_path_factory.mktemp("pq") / "shard"
    make_shard(path, "pq", x, ids, books)
    return path


@pytest.fixture(scope="module")
def flat_shard(tmp_path_factory, shard_data):
    x, ids, _ = shard_data
    path = tmp_path_factory.mktemp("flat") / "shard"
    make_shard(path, "flat", x, ids)
    return path


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfflat"])
def test_search_refuses_raw_index_kinds(tmp_path, shard_data, kind):
    x, ids, _ = shard_data
    make_shard(tmp_path / "s", kind, x[:50], ids[:50])
    assert Shard.open(tmp_path / "s").encoded
    with pytest.raises(Refusal) as info:
        shard_store.search(tmp_path / "s", x[:2], SearchRequest(mode="search", k=5), policy())
    assert info.value.limit == "index-kind" and kind in info.value.reason
    with pytest.raises(Refusal, match="stores raw vectors"):
        shard_store.search(tmp_path / "s", x[:2], SearchRequest(mode="search", radius=1.0), policy())


def test_pq_search_distances_on_grid(pq_shard, shard_data):
    x, ids, _ = shard_data
    q = x[:8] + 0.05
    out, version = shard_store.search(pq_shard, q, SearchRequest(mode="search", k=10), policy(distance_grid=0.01))
    assert version == 0 and set(out) == {"distances", "ids"}
    d_raw, i_raw = Shard.open(pq_shard).search(q, 10)
    np.testing.assert_array_equal(out["ids"], i_raw)
    steps = out["distances"].astype(np.float64) / 0.01
    assert np.abs(steps - np.round(steps)).max() < 1e-3
    assert np.abs(out["distances"] - d_raw).max() <= 0.005 + 1e-5
    assert np.isin(out["ids"], ids).all()
    # the compressed distance, not the exact one from the raw vectors
    exact = ((q[:, None, :] - x[np.searchsorted(ids, out["ids"])]) ** 2).sum(-1)
    assert np.abs(exact - out["distances"]).max() > 0.01


def test_pq_search_padding_with_k_above_shard_size(tmp_path, shard_data):
    x, ids, books = shard_data
    make_shard(tmp_path / "s", "pq", x[:5], ids[:5], books)
    out, _ = shard_store.search(tmp_path / "s", x[:1], SearchRequest(mode="search", k=8), policy())
    assert (out["ids"][0, 5:] == -1).all()
    d_raw, _ = Shard.open(tmp_path / "s").search(x[:1], 8)
    np.testing.assert_array_equal(out["distances"][0, 5:], d_raw[0, 5:])  # padding as faiss returns it


def test_pq_range_search_within_limit_is_rounded(pq_shard, shard_data):
    x, _, _ = shard_data
    q = x[:3]
    shard = Shard.open(pq_shard)
    radius = float(shard.search(q, 40)[0][:, 20].min())  # about 20 results per query
    lims_raw, d_raw, i_raw = shard.range_search(q, radius)
    assert 0 < np.diff(lims_raw).max() <= 100
    out, _ = shard_store.search(pq_shard, q, SearchRequest(mode="search", radius=radius), policy(distance_grid=0.1))
    np.testing.assert_array_equal(out["lims"], lims_raw)
    np.testing.assert_array_equal(out["ids"], i_raw)
    steps = out["distances"].astype(np.float64) / 0.1
    assert np.abs(steps - np.round(steps)).max() < 1e-3


def test_pq_range_search_above_limit_is_refused_whole(pq_shard, shard_data):
    x, _, _ = shard_data
    with pytest.raises(Refusal) as info:
        shard_store.search(pq_shard, x[:2], SearchRequest(mode="search", radius=1e6), policy(max_range_results=100))
    assert info.value.limit == "max-range-results" and "300 results" in info.value.reason
    out, _ = shard_store.search(pq_shard, x[:2], SearchRequest(mode="search", radius=1e6), policy(max_range_results=300))
    assert np.diff(out["lims"]).tolist() == [300, 300]


# ================================================================ ClientApp replies


def message(message_type: str, content: dict) -> Message:
    md = Metadata(run_id=1, message_id=f"m-{time.monotonic_ns()}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=RecordDict(content), metadata=md)


def query_msg(queries: np.ndarray, **config) -> Message:
    return message("query", {"config": ConfigRecord(config), "queries": ArrayRecord({"vectors": Array(np.ascontiguousarray(queries))})})


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def refusal_of(reply: Message) -> tuple[str, str]:
    rec = reply.content["refusal"]
    return rec["limit"], rec["reason"]


def test_client_app_refuses_k_above_node_limit(tmp_path):
    app = make_client_app()  # limits from the node config
    ctx = context({"shard-dir": str(tmp_path / "nothing-here"), "max-k": 7})
    limit, reason = refusal_of(app(query_msg(np.zeros((1, D), np.float32), mode="search", k=8), ctx))
    assert limit == "max-k" and "max-k=7" in reason
    # simulator-held policy: the same request against policy max_k
    app2 = make_client_app(policy(max_k=20))
    limit, _ = refusal_of(app2(query_msg(np.zeros((1, D), np.float32), mode="search", k=21), ctx))
    assert limit == "max-k"


def test_client_app_query_budget_spans_messages(pq_shard, shard_data):
    x, ids, _ = shard_data
    app = make_client_app()
    ctx = context({"shard-dir": str(pq_shard), "query-budget": 3, "distance-grid": 0.5})
    ok = app(query_msg(x[:2], mode="search", k=4), ctx)
    assert "refusal" not in ok.content
    d = ok.content["results"]["distances"].numpy()
    assert d.shape == (2, 4) and np.all(d / 0.5 == np.round(d / 0.5))
    assert np.isin(ok.content["results"]["ids"].numpy(), ids).all()
    limit, reason = refusal_of(app(query_msg(x[:2], mode="search", k=4), ctx))
    assert limit == "query-budget" and "query-budget=3" in reason
    ok = app(query_msg(x[:1], mode="search", k=4), ctx)  # exactly the rest of the budget
    assert "results" in ok.content
    assert refusal_of(app(query_msg(x[:1], mode="search", k=4), ctx))[0] == "query-budget"


def test_client_app_shard_node_refuses_trusted_eval(pq_shard):
    cfg = composed(*SMALL)
    cfg["eval"]["protocol"] = "trusted"
    rec = client_config(load_experiment(cfg))
    limit, reason = refusal_of(make_client_app()(query_msg(np.zeros((2, D), np.float32), **dict(rec.items())),
                                                 context({"shard-dir": str(pq_shard)})))
    assert limit == "trusted-eval" and "simulations only" in reason


def test_client_app_flat_shard_search_refused(flat_shard, shard_data):
    x, _, _ = shard_data
    limit, reason = refusal_of(make_client_app()(query_msg(x[:1], mode="search", k=3), context({"shard-dir": str(flat_shard)})))
    assert limit == "index-kind" and "flat" in reason


def test_client_app_range_above_limit_refused(pq_shard, shard_data):
    x, _, _ = shard_data
    ctx = context({"shard-dir": str(pq_shard), "max-range-results": 50})
    limit, reason = refusal_of(make_client_app()(query_msg(x[:1], mode="search", radius=1e6), ctx))
    assert limit == "max-range-results" and "max-range-results=50" in reason


def test_client_app_tiny_shard_init_is_withheld(tmp_path, shard_data):
    x, ids, _ = shard_data
    make_shard(tmp_path / "tiny", "flat", x[:3], ids[:3])
    cfg = composed(*SMALL, "privacy=trusted", "init.source=clients")  # k-FED init: the trusted protocol only
    config = ConfigRecord({**dict(client_config(load_experiment(cfg)).items()), "init-level": "pq"})
    msg = message("train.init", {"config": config, "arrays": encoder_record(initial_weights(D, "rotation"))})
    reply = make_client_app(ClientPolicy.for_simulation(load_experiment(cfg)))(msg, context({"shard-dir": str(tmp_path / "tiny")}))
    assert "init" not in reply.content
    assert "3 vector(s)" in reply.content["withheld"]["reason"] and "min-count=5" in reply.content["withheld"]["reason"]
    assert reply.content["metrics"]["num-examples"] == 0.0


# ================================================================ 7. config validate


def test_valid_configs_pass():
    validate(composed(*SMALL), dim=D, num_vectors=3000)
    cfg = composed(*SMALL, "privacy=off")
    cfg["eval"]["protocol"], cfg["init"]["source"] = "trusted", "public"
    validate(cfg, dim=D, num_vectors=3000)


@pytest.mark.parametrize("override, key", [("eval.protocol=foo", "eval.protocol"), ("privacy.distance_grid=-1", "privacy.distance_grid")])
def test_validate_names_the_key_from_hydra_overrides(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        validate(composed(*SMALL, override), dim=D, num_vectors=3000)


@pytest.mark.parametrize(
    "key, value",
    [
        ("eval.protocol", "foo"),
        ("init.source", "foo"),
        ("eval.local_queries", 0),
        ("eval.local_queries", 1.5),
        ("privacy.max_k", 0),
        ("privacy.min_count", 0),
        ("privacy.max_range_results", True),
        ("privacy.query_budget", -1),
        ("privacy.distance_grid", -1),
        ("privacy.distance_grid", float("nan")),
        ("privacy.examples_digits", -1),
    ],
)
def test_validate_names_the_key(key, value):
    cfg = composed(*SMALL)
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}:"):
        validate(cfg, dim=D, num_vectors=3000)


def test_validate_trusted_k_above_privacy_max_k():
    cfg = composed(*SMALL)
    cfg["eval"]["k"], cfg["privacy"]["max_k"] = 50, 20
    validate(cfg, dim=D, num_vectors=3000)  # private protocol: k never leaves a shard
    cfg["eval"]["protocol"] = "trusted"
    with pytest.raises(ConfigError, match=r"^eval\.k: 50 exceeds privacy\.max_k=20"):
        validate(cfg, dim=D, num_vectors=3000)


@pytest.mark.parametrize(("key", "value", "limit"), [("train.local_epochs", 11, "max-local-epochs"), ("init.kmeans_iters", 101, "max-kmeans-iters")])
def test_a_client_refuses_more_work_than_its_own_limit(key, value, limit):
    """The server picks train.local_epochs and init.kmeans_iters; the client bounds them
    itself (defaults 10 and 100), so a hostile server cannot make it work without end."""
    exp = load_experiment(composed(*SMALL, "privacy=trusted"))
    config = client_config(exp)
    config[key] = value
    config["server-round"] = 1
    msg = message("train", {"config": config, "arrays": encoder_record(initial_weights(D, "rotation"))})
    reply = make_client_app(ClientPolicy.for_simulation(exp))(msg, context({"partition-id": 0, "num-partitions": exp.num_clients}))
    got_limit, reason = refusal_of(reply)
    assert got_limit == limit and f"{key}={value}" in reason, reason
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: {value} exceeds privacy\.{limit.replace('-', '_')}"):
        validate(composed(*SMALL, "privacy=trusted", f"{key}={value}"), dim=D, num_vectors=3000)
