"""The attack suite: real Flower simulations in which the server is an attacker.

Each setting trains once through a recording, rewriting proxy on the server's Grid
(``simulations.attack_suite``), then probes the clients as an active server would; the
tests below read what it got. Under the defaults (``privacy=secure``: secure
aggregation + DP) every attack recovers 0 raw vectors; with ``eval.protocol=trusted
privacy=off`` (the protocol before the protections, kept as a research mode) each one
demonstrably recovers vectors, so the tests can fail.

The differencing attacks (a set of clients minus a smaller one, the same clients
under other codebooks) and federation-wide count-one cells run on a small GloVe subset
under each privacy group: off, trusted (min-count), secagg (secure aggregation without
noise) and secure (the default), so each layer's share is measured.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fed_app.local_data import client_partitions
from fed_app.config import compose_config, load_experiment
from simulations.attack_suite import EXPOSURE_TOL, rewrite_to_raise_k, run_setting

# 20 non-IID shards (some of a few vectors) of 1,500 16-d vectors, PQ 4x6, 2 rounds
BASE = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6",
        "init.local_k=64", "num_clients=20", "num_rounds=2", "partition=dirichlet", "partition.alpha=0.3",
        "partition.num_clusters=20", "eval.centralized=false"]
# init.source=clients: the k-FED init the exposure attacks read (the default init is now public)
UNPROTECTED = ["eval.protocol=trusted", "privacy=off", "init.source=clients"]
BUDGET = 500  # the protected setting's query budget, so the budget attack ends within the test
# 200 shards of 1,500 vectors: most smaller than init.local_k, many below min-count
SMALL = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6",
         "init.local_k=64", "num_clients=200", "num_rounds=1", "partition=dirichlet", "partition.alpha=0.1",
         "partition.num_clusters=20", "eval.centralized=false", "save_shards=false"]
# min-count on k-FED init (init.source=clients exists only for nodes without secure aggregation)
MIN_COUNT = ["privacy=trusted", "init.source=clients"]
# differencing: 2,000 GloVe vectors (L2-normalised: the DP clip of 1 clips nothing) on 10
# Dirichlet shards, PQ 10x8 (256 cells per sub-space: some hold a single vector), 1 round
GLOVE = ["data=glove", "data.num_base=2000", "data.num_queries=300", "index.m=10", "index.nbits=8", "num_clients=10",
         "num_rounds=1", "partition=dirichlet", "partition.alpha=0.3", "partition.num_clusters=20", "eval.centralized=false",
         "save_shards=false"]
GROUPS = ("off", "trusted", "secagg", "secure")


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    # during training the server also rewrites every config: eval.k=10000, trusted protocol
    return run_setting("defaults", [*BASE, f"privacy.query_budget={BUDGET}"], tmp_path_factory.mktemp("protected"),
                       rewrite=rewrite_to_raise_k(10_000))


@pytest.fixture(scope="module")
def unprotected(tmp_path_factory):
    return run_setting("trusted, privacy=off", [*BASE, *UNPROTECTED], tmp_path_factory.mktemp("unprotected"))


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    # min-count rather than the defaults: under secure aggregation a 200-node session costs
    # O(n^2) key agreements (minutes here) and the shards send no statistic of their own
    # at all; the defaults' small shards are the protected setting's and the GloVe runs'
    on = run_setting("200 shards, min-count", [*SMALL, *MIN_COUNT], tmp_path_factory.mktemp("small-on"), probe=False)
    off = run_setting("200 shards, privacy=off", [*SMALL, *UNPROTECTED], tmp_path_factory.mktemp("small-off"), probe=False)
    return on, off


@pytest.fixture(scope="module")
def differencing(tmp_path_factory):
    """Each privacy group on the same GloVe federation; after training the server asks
    again with train.local_epochs=0 (one encoder space): the final model and the last round's
    codebooks over every node and, under secure aggregation, every node but one (twice)."""
    return {g: run_setting(f"differencing, privacy={g}", [*GLOVE, f"privacy={g}"], tmp_path_factory.mktemp(f"diff-{g}"), probe=False,
                           differencing=True) for g in GROUPS}


def test_defaults_recover_no_vector(protected):
    r = protected
    assert r.recovered and all(v == 0 for v in r.recovered.values()), r.recovered
    assert r.small_cells == 0, "a count below min-count left a client"
    # the training-time rewrite changed nothing the clients hold: no distance left them
    assert r.recovered["trilateration_training"] == 0
    privacy = r.summary["final"]["privacy"]
    assert privacy["eval_protocol"] == "private" and privacy["node_limits"]["min-count"] == 5
    assert privacy["secure_aggregation"] and privacy["differential_privacy"]["on"]
    assert r.summary["final"]["federated"]["source"].startswith("simulator")
    # no reply carried a statistic: the scans above read the sums the server decoded from
    # the masked inputs, one per training round, each over every node
    assert r.secure_sums == [(20, 20.0)] * 2, r.secure_sums


def test_defaults_refuse_raised_k_trusted_eval_and_radius_by_name(protected):
    r = protected
    n = 20
    # the evaluation path (exact distances) is refused by every node, naming why
    assert r.refusals["raised_k"] == n and r.limits["raised_k"] == ["trusted-eval"]
    assert r.refusals["crafted_probes"] == n and r.limits["crafted_probes"] == ["trusted-eval"]
    # search mode: k=1000 > max-k=100 everywhere; a huge radius on every shard above 100 vectors
    assert r.refusals["search_raised_k"] == n and r.limits["search_raised_k"] == ["max-k"]
    assert r.codes["search_raised_k"] == 0
    big = sum(1 for p in client_partitions(load_experiment(compose_config(BASE))) if p.size > 100)
    assert big >= 1 and r.refusals["search_radius"] == big and r.limits["search_radius"] == ["max-range-results"]


def test_defaults_enforce_the_query_budget(protected):
    r = protected
    # 100 + 200 queries answered before the budget attack; it asks 200 at a time
    assert r.refusals["exhaust_budget"] == 20 and "query-budget" in r.limits["exhaust_budget"], (r.refusals, r.limits)


def test_within_limits_search_gives_codes_never_raw_vectors(protected):
    """An authorised querier within the limits learns compressed distances only: at most
    the stored PQ codes of vectors near its probes (docs/privacy.md), never a raw vector."""
    r = protected
    assert r.recovered["search_probes"] == 0 and r.recovered["search_radius"] == 0
    assert r.codes["search_probes"] <= r.num_vectors


def test_unprotected_protocol_leaks_with_every_attack(unprotected):
    r = unprotected
    assert r.recovered["trilateration_training"] > 0, r.recovered  # small shards answer every query
    assert r.recovered["raised_k"] >= 0.9 * r.num_vectors, r.recovered  # (nearly) every vector, exactly
    assert r.recovered["crafted_probes"] > 0, r.recovered
    assert r.recovered["exposure_subvectors"] > 0 and r.recovered["exposure_full_vectors"] > 0, r.recovered
    assert r.small_cells > 0
    # search answers are on codes even here: the stored codes, all of them, not raw vectors
    assert r.codes["search_raised_k"] == r.codes["search_radius"] == r.num_vectors, r.codes
    assert r.recovered["search_raised_k"] == 0
    assert not any(r.refusals.values()), r.refusals
    assert r.summary["final"]["privacy"]["warnings"], "the unprotected mode must say so in summary.json"


def test_200_small_shards_send_no_vector(small_shards):
    """min-count on k-FED init and Lloyd cells (privacy=trusted, init.source=clients)."""
    on, off = small_shards
    assert off.recovered["exposure_full_vectors"] > 0, off.recovered  # shards sent their vectors as "centroids"
    assert off.small_cells > 0
    assert on.recovered["exposure_full_vectors"] == 0 and on.recovered["exposure_subvectors"] == 0, on.recovered
    assert on.small_cells == 0
    sizes = [p.size for p in client_partitions(load_experiment(compose_config(SMALL)))]
    withheld = on.summary["final"]["privacy"]["withheld"]["init"]
    assert len(withheld) == sum(1 for s in sizes if s < 5) > 0, (len(withheld), sorted(sizes)[:20])
    assert all("min-count=5" in why for why in withheld.values())


def test_protections_cost_little_recall(protected, unprotected):
    on = protected.summary["final"]["federated"]["recall_10_at_10"]
    off = unprotected.summary["final"]["federated"]["recall_10_at_10"]
    # the defaults (public init, secure aggregation, DP noise drawn afresh every run) against
    # the old unprotected protocol (k-FED init), on 1,500 vectors in shards of ~75 with 64
    # cells per sub-space, where the noise weighs far more than on real shards: 12 runs
    # (stop 10) gave 0.302-0.348 against 0.376, i.e. 0.80-0.93x (the 0.85x bound of stop 9
    # failed about one run in three, on that code too). On GloVe 100k the same defaults keep
    # 0.95x: simulations.benchmark_privacy --dp, docs/results/privacy/benchmark_dp.md
    assert on >= 0.75 * off, (on, off)
    # under DP the evaluation is one noisy sum of distortion and energy: no shard sends a
    # recall estimate (nor could it under the rewritten eval.k=10000): no figure, not NaN
    assert json.dumps(protected.summary, allow_nan=False)
    assert "recall_10_at_10" not in protected.summary["final"]["federated_estimate"]
    assert np.isfinite(unprotected.summary["final"]["federated_estimate"]["recall_10_at_10"])


def test_differencing_and_lone_cells_leak_without_secure_aggregation(differencing):
    off, trusted = differencing["off"], differencing["trusted"]
    # plain per-client statistics: lone vectors in the aggregate and in differences
    assert off.recovered["federation_cells_subvectors"] > 0, off.recovered
    assert off.recovered["difference_subvectors"] > 0, off.recovered
    # min-count: no client releases a cell below 5, so no cell of the aggregate holds one
    # vector; the same client under two codebooks still gives away the vectors that moved
    assert trusted.small_cells == 0 and trusted.recovered["federation_cells_subvectors"] == 0, trusted.recovered
    assert trusted.recovered["difference_subvectors"] > 0, trusted.recovered


def test_secure_aggregation_without_noise_stops_lone_cells_not_differencing(differencing):
    r = differencing["secagg"]
    # the server decoded every sum from the masked traffic, exactly (the "clients" entry
    # counts the survivors): the training round, then its four differencing requests
    assert r.secure_sums == [(10, 10.0)] * 3 + [(9, 9.0)] * 2, r.secure_sums
    assert r.recovered["exposure_subvectors"] == 0 and r.small_cells == 0
    # every client still withholds cells below min-count inside the sum: no lone cells
    assert r.recovered["federation_cells_subvectors"] == 0, r.recovered
    # but exact sums under two codebooks still differ by the vectors that moved: the
    # control for the default, where only the DP noise is added
    assert r.recovered["difference_subvectors"] > 0, r.recovered


def test_defaults_stop_differencing_and_lone_cells(differencing):
    r = differencing["secure"]
    assert r.secure_sums == [(10, 10.0)] * 3 + [(9, 9.0)] * 2, r.secure_sums  # every request was summed (DP budget: 6 of 11)
    assert r.recovered and all(v == 0 for v in r.recovered.values()), r.recovered
    # the attacks did find cells whose noisy count reads as one: their sums are noise
    assert r.candidate_cells["difference_subvectors"] > 0 and r.candidate_cells["federation_cells_subvectors"] > 0, r.candidate_cells
    assert min(r.candidate_error.values()) > 1000 * EXPOSURE_TOL, r.candidate_error
