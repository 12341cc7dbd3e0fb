"""The ClientApp's side of secure aggregation, message by message: a whole session over
four nodes sums exactly, the DP release budget is the node's own, and every stage a
node is not in, or that its limits forbid, is refused by name."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fed_app.client_app import make_client_app, secure_setup
from fed_app.config import compose_config
from fed_app.privacy.policy import ClientPolicy
from fed_app.secagg import fixed_point
from fed_app.secagg.rounds import flatten, setup_record
from fed_app.secagg.server import threshold_for, unmask_sum


def message(message_type: str, content: dict, dst: int = 7) -> Message:
    md = Metadata(run_id=1, message_id=f"m-{time.monotonic_ns()}", src_node_id=0, dst_node_id=dst, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=RecordDict(content), metadata=md)


def policy(**changes) -> ClientPolicy:
    values = dict(compose_config([])["privacy"])
    values.update(changes)
    return ClientPolicy.from_mapping(values, "test")


def refusal(reply: Message) -> str:
    assert "refusal" in reply.content.config_records, reply.content
    return f"{reply.content['refusal']['limit']}: {reply.content['refusal']['reason']}"


def session(app, pol, contexts, stats, name="s1"):
    """One whole session through the ClientApp; returns the decoded sum (or a refusal)."""
    nodes = sorted(contexts)
    keys = {}
    for n in nodes:
        reply = secure_setup(message("train", {"secagg": setup_record(name)}, n), contexts[n], pol, stats[n], {k: 1.0 for k in stats[n]})
        keys[n] = (reply.content["secagg"]["c-pk"], reply.content["secagg"]["s-pk"])
    t = threshold_for(len(nodes), pol.secagg_threshold)
    roster = {"roster": [str(n) for n in nodes], "c-pk": [keys[n][0] for n in nodes], "s-pk": [keys[n][1] for n in nodes], "threshold": t}
    sent = {}
    for n in nodes:
        r = app(message("query.secagg", {"secagg": ConfigRecord({"session": name, "stage": "share", **roster})}, n), contexts[n])
        sent[n] = dict(zip([int(d) for d in r.content["secagg"]["dst"]], r.content["secagg"]["ciphertexts"]))
    masked = {}
    for v in nodes:
        senders = [u for u in nodes if u != v]
        r = app(message("query.secagg", {"secagg": ConfigRecord({"session": name, "stage": "mask", "senders": [str(u) for u in senders],
                                                                 "ciphertexts": [sent[u][v] for u in senders]})}, v), contexts[v])
        if "refusal" in r.content.config_records:
            return r
        masked[v] = r.content["masked"]["y"].numpy()
    revealed = {}
    for n in nodes:
        r = app(message("query.secagg", {"secagg": ConfigRecord({"session": name, "stage": "unmask", "survivors": [str(u) for u in nodes]})}, n), contexts[n])
        rec = r.content["secagg"]
        revealed[n] = [(int(p), str(k), bytes(s)) for p, k, s in zip(rec["peers"], rec["kinds"], rec["shares"])]
    total = unmask_sum(name, nodes, [keys[n][1] for n in nodes], t, masked, revealed, [])
    return fixed_point.decode(total, pol.fixed_point_bits)


def contexts_for(nodes):
    return {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}


NODES = [3, 2**63 + 5, 11, 2**64 - 2]  # Flower node ids are uint64


def test_a_session_through_the_client_app_sums_exactly():
    pol = policy(dp_epsilon=0.0)
    rng = np.random.default_rng(0)
    stats = {n: {"sums": rng.normal(size=(2, 3)), "count": np.array([float(i + 1)])} for i, n in enumerate(NODES)}
    total = session(make_client_app(pol), pol, contexts_for(NODES), stats)
    expected = flatten({k: sum(stats[n][k] for n in NODES) for k in ("sums", "count")})
    assert np.allclose(total, expected, atol=len(NODES) * 2.0**-24)


def test_the_dp_release_budget_is_the_nodes_own():
    pol = policy(dp_max_releases=1)
    app, ctx = make_client_app(pol), contexts_for(NODES)
    stats = {n: {"sums": np.zeros(4)} for n in NODES}
    first = session(app, pol, ctx, stats, "one")
    assert np.abs(first).max() > 0  # noise was added: no party sees the exact zero sum
    assert "dp-max-releases: this node has taken part in its dp-max-releases=1" in refusal(session(app, pol, ctx, stats, "two"))


def test_stages_a_node_did_not_open_are_refused():
    pol = policy()
    app, ctx = make_client_app(pol), contexts_for([5])
    no_session = app(message("query.secagg", {"secagg": ConfigRecord({"session": "x", "stage": "mask"})}, 5), ctx[5])
    assert "no secure-aggregation session is open" in refusal(no_session)
    secure_setup(message("train", {"secagg": setup_record("mine")}, 5), ctx[5], pol, {"a": np.zeros(2)}, {"a": 0.0})
    other = app(message("query.secagg", {"secagg": ConfigRecord({"session": "other", "stage": "share"})}, 5), ctx[5])
    assert "another secure-aggregation session" in refusal(other)
    early = app(message("query.secagg", {"secagg": ConfigRecord({"session": "mine", "stage": "unmask", "survivors": ["5"]})}, 5), ctx[5])
    assert "out of order" in refusal(early)


@pytest.mark.parametrize("message_type", ["train", "evaluate", "train.init"])
def test_a_secure_node_sends_no_statistics_outside_a_secure_sum(message_type):
    app = make_client_app(policy())
    reply = app(message(message_type, {"config": ConfigRecord({}), "arrays": ArrayRecord({"x": Array(np.zeros(1))})}), contexts_for([7])[7])
    assert refusal(reply).startswith("secure-aggregation: ")
