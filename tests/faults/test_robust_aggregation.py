"""The robust encoder strategies (Flower's FedMedian, FedTrimmedAvg, Krum under our
codebook mixin) keep the encoder where the honest clients put it when one client's
encoder is finite and within bounds but wrong, where FedAvg follows it; and they are
refused under secure aggregation, which hides the single updates they need."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from fed_app.config import ConfigError, compose_config, validate
from fed_app.state import ENCODER, arrays_of, encoder_record, record_of
from fed_app.strategy import FederatedPQ, FederatedPQKrum, FederatedPQMedian, FederatedPQTrimmedAvg

D, M, K = 8, 2, 4


def reply(node: int, weight: np.ndarray, rng) -> Message:
    md = Metadata(run_id=1, message_id=f"r-{node}-{time.monotonic_ns()}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    counts = np.full((M, K), 25, np.int32)
    sums = (rng.normal(size=(M, K, D // M)) * 0.1 * 25).astype(np.float32)
    content = RecordDict({
        "arrays": encoder_record({"linear.weight": weight.astype(np.float32), "linear.bias": np.zeros(D, np.float32)}),
        "codebook-update": record_of({"pq.sums": sums, "pq.counts": counts}),
        "metrics": MetricRecord({"num-examples": 100.0}),
    })
    return Message(content=content, metadata=md)


@pytest.mark.parametrize("robust, kwargs", [(FederatedPQMedian, {}), (FederatedPQTrimmedAvg, {"beta": 0.2}), (FederatedPQKrum, {"num_malicious_nodes": 1})])
def test_one_wrong_encoder_moves_fedavg_but_not_the_robust_strategies(robust, kwargs):
    rng = np.random.default_rng(0)
    honest = [np.eye(D) + rng.normal(size=(D, D)) * 0.01 for _ in range(5)]
    wrong = np.eye(D) * 40.0  # finite, invertible, within max-gain 100: passes every check
    results = {}
    for cls, kw in ((FederatedPQ, {}), (robust, kwargs)):
        strategy = cls(min_train_nodes=1, min_available_nodes=1, **kw)
        strategy._codebooks = {"codebook.pq": np.zeros((M, K, D // M), np.float32)}
        strategy._sent[1] = list(range(1, 7))
        replies = [reply(i + 1, w, rng) for i, w in enumerate([*honest, wrong])]
        record, _ = strategy.aggregate_train(1, replies)
        results[cls.__name__] = arrays_of(record)[ENCODER + "linear.weight"]
    assert np.abs(results["FederatedPQ"] - np.eye(D)).max() > 5  # the average follows the wrong client
    assert np.abs(results[robust.__name__] - np.eye(D)).max() < 0.1, results[robust.__name__]


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_are_refused_under_secure_aggregation(strategy):
    with pytest.raises(ConfigError, match=rf"^strategy: {strategy} aggregates each client's encoder robustly, which secure aggregation hides"):
        validate(compose_config([f"strategy={strategy}"]), 50, 100_000)
    validate(compose_config([f"strategy={strategy}", "privacy=trusted"]), 50, 100_000)


def test_krum_needs_more_than_2f_plus_2_clients():
    with pytest.raises(ConfigError, match=r"^strategy\.flower\.num_malicious_nodes: Krum tolerates f hostile clients only among n > 2f \+ 2"):
        validate(compose_config(["strategy=krum", "privacy=trusted", "num_clients=4"]), 50, 100_000)
    validate(compose_config(["strategy=krum", "privacy=trusted", "num_clients=5"]), 50, 100_000)
