"""One client of ten sends a different hostile reply in every round of a real Flower
simulation (plain protocol, where the server can read single replies): NaN sums, 1e30
sums, negative counts, num-examples 1e12 and -3, a missing record, a truncated array, a
NaN evaluation. The run completes, each bad reply is dropped with the node named in the
log and in summary.json, and the final recall stays >= 0.98x a clean run."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from conftest import CLEAN, TINY
from flwr.app import ConfigRecord, Context, Message, MetricRecord

from fed_app.config import compose_config
from fed_app.state import arrays_of, record_of
from simulations.run import simulate

HOSTILE_PARTITION = 3
FAULTS = {  # round -> (what the hostile node sends, the reason the server must give)
    1: ("nan-sums", r"array 'pq\.sums' holds NaN"),
    2: ("huge-sums", r"pq\.sums: a cell's sum exceeds its count"),
    3: ("negative-counts", r"pq\.counts: negative counts"),
    4: ("examples-1e12", r"num-examples=1e\+12 is more than pq\.counts account for"),
    5: ("examples-negative", r"num-examples must be an integer >= 1, got -3"),
    6: ("missing-record", r"no 'codebook-update' record"),
    7: ("truncated", r"array 'pq\.sums' has shape \(4, 63, 4\)"),
}
EVAL_FAULT_ROUND = 8  # the evaluation reply after round 8 carries a NaN distortion


def hostile(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: the honest reply, corrupted on one node."""
    reply = call_next(msg, context)
    if int(context.node_config["partition-id"]) != HOSTILE_PARTITION or reply.has_error():
        return reply
    rnd = int(msg.content["config"]["server-round"]) if "server-round" in msg.content["config"] else 0
    kind = msg.metadata.message_type
    if kind == "evaluate" and rnd == EVAL_FAULT_ROUND:
        metrics = dict(reply.content["metrics"].items())
        reply.content["metrics"] = MetricRecord({**metrics, "distortion": float("nan")})
    if kind != "train" or rnd not in FAULTS:
        return reply
    fault = FAULTS[rnd][0]
    update = arrays_of(reply.content["codebook-update"])
    metrics = dict(reply.content["metrics"].items())
    if fault == "nan-sums":
        update["pq.sums"][0, 0, 0] = np.nan
    elif fault == "huge-sums":
        update["pq.sums"] = update["pq.sums"] * np.float32(1e30)
    elif fault == "negative-counts":
        update["pq.counts"] = -update["pq.counts"]
    elif fault == "examples-1e12":
        metrics["num-examples"] = 1e12
    elif fault == "examples-negative":
        metrics["num-examples"] = -3.0
    elif fault == "truncated":
        update["pq.sums"] = update["pq.sums"][:, :-1]
    if fault == "missing-record":
        del reply.content["codebook-update"]
    else:
        reply.content["codebook-update"] = record_of(update)
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clean_run):
    cfg = compose_config(CLEAN)
    out = tmp_path_factory.mktemp("hostile")
    clean = clean_run
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        attacked = json.loads(simulate(cfg, out / "attacked", client_mods=[hostile]).read_text())
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    return clean, attacked, lines


def test_the_run_completes_and_names_the_node_for_every_hostile_reply(runs):
    clean, attacked, log = runs
    assert clean["rejected_nodes"] == [] and clean["rejected_models"] == {}
    rejected = attacked["rejected_nodes"]
    nodes = {r["node"] for r in rejected}
    assert len(nodes) == 1, rejected  # always the same node, and only it
    node = next(iter(nodes))
    by_round = {(r["round"], r["phase"]): r["reason"] for r in rejected}
    for rnd, (fault, reason) in FAULTS.items():
        assert (rnd, "train") in by_round, f"round {rnd} ({fault}) was not rejected: {rejected}"
        assert re.search(reason, by_round[(rnd, "train")]), (fault, by_round[(rnd, "train")])
        named = [line for line in log if line.startswith(f"round {rnd}: train reply of node {node} rejected")]
        assert named, f"the log does not name the node for round {rnd}"
    assert "distortion must be in" in by_round[(EVAL_FAULT_ROUND, "evaluate")]
    assert len(rejected) == len(FAULTS) + 1
    assert attacked["rejected_models"] == {}  # what was aggregated was sound
    for row in attacked["rounds"][1:]:
        assert row["clients"] >= 9  # the others were aggregated every round
        assert np.isfinite(row["distortion"])


def test_the_hostile_node_costs_only_its_own_contribution(runs):
    clean, attacked, _ = runs
    ours, theirs = attacked["final"]["federated"]["recall_10_at_10"], clean["final"]["federated"]["recall_10_at_10"]
    assert ours >= 0.98 * theirs, (ours, theirs)


def masked_too_much(msg: Message, context: Context, call_next) -> Message:
    """Under secure aggregation a node can only skew its own masked input: this one adds
    2^60 to every entry of its masked input in the first training round's secure sum
    (within the field, invisible until the sum is unmasked). What it has done is kept in
    its Context.state, which Flower carries from message to message on the node."""
    reply = call_next(msg, context)
    if int(context.node_config["partition-id"]) != HOSTILE_PARTITION or reply.has_error():
        return reply
    records = context.state.config_records
    if msg.metadata.message_type == "train" and "hostile" not in records:
        context.state["hostile"] = ConfigRecord({"armed": 1})  # this training round's sum is the one to skew
    elif "masked" in reply.content.array_records and "hostile" in records and int(records["hostile"]["armed"]) == 1:
        y = reply.content["masked"]["y"].numpy()
        reply.content["masked"] = record_of({"y": (y + np.uint64(2**60)).astype(y.dtype)})
        context.state["hostile"] = ConfigRecord({"armed": 0})
    return reply


def test_under_secure_aggregation_a_skewed_sum_is_caught_as_a_model_and_not_applied(tmp_path):
    """The server cannot see which input was skewed, but the unmasked aggregate fails
    the model checks: that round's model is not applied (summary.json rejected_models),
    the run goes on and finishes with a sound model."""
    cfg = compose_config([*TINY, "num_rounds=2", "save_shards=false", "eval.centralized=false"])  # privacy=secagg
    summary = json.loads(simulate(cfg, tmp_path / "run", client_mods=[masked_too_much]).read_text())
    assert list(summary["rejected_models"]) == ["1"], summary["rounds"]  # round 1's sum was skewed, and only it
    reason = next(iter(summary["rejected_models"].values()))
    assert "exceeds" in reason or "NaN" in reason or "singular" in reason, reason
    assert np.isfinite(summary["final"]["federated"]["distortion"]) and summary["final"]["federated"]["recall_10_at_10"] > 0.1
