"""The attack suite's building blocks: trilateration and exposure maths on numpy arrays,
and the recording/rewriting ServerProxy inside a real (tiny) Flower simulation."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fed_app.secagg import client as secagg_client
from fed_app.secagg import fixed_point
from fed_app.secagg.rounds import LAYOUT, MESSAGE_TYPE, SETUP, flatten, layout_record
from fed_app.secagg.server import threshold_for
from simulations.attacks import (
    Exchange,
    Observation,
    ServerProxy,
    count_one_rows,
    count_recovered,
    decoded_secure_sums,
    difference_candidates,
    exposure_scan,
    exposure_scan_subspaces,
    federation_candidates,
    rows_of,
    small_cells,
    trilaterate,
)

D = 50


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    """L2-normalised float32 rows, like fedvec's GloVe data."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def all_hits(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray):
    """Every (query, id, squared distance): what an exhaustive k = n search returns."""
    dist = ((queries[:, None, :].astype(np.float64) - vectors[None].astype(np.float64)) ** 2).sum(-1)
    nq, n = dist.shape
    return np.repeat(np.arange(nq), n), np.tile(ids, nq), dist.ravel()


# -- trilateration ---------------------------------------------------------------------


def test_trilateration_recovers_points_from_60_queries():
    rng = np.random.default_rng(0)
    x, q = unit(rng, 100), unit(rng, 60)
    ids = np.arange(1000, 1100, dtype=np.int64)
    qi, hid, dist = all_hits(q, x, ids)
    perm = rng.permutation(qi.size)  # hits arrive in any order
    qi, hid, dist = qi[perm], hid[perm], dist[perm]
    qi = np.concatenate([qi, [0, 1]])  # padding hits (id -1) are ignored
    hid = np.concatenate([hid, [-1, -1]])
    dist = np.concatenate([dist, [0.0, 1e30]])
    est = trilaterate(q, qi, hid, dist)
    assert sorted(est) == list(ids)
    for i, e in est.items():
        np.testing.assert_allclose(e, x[i - 1000], atol=1e-4)
    assert count_recovered(est, ids, x, 1e-4) == 100
    assert count_recovered({5: x[0]}, ids, x, 1e-4) == 0  # an id the attacker can't check


def test_trilateration_needs_d_plus_1_distinct_queries():
    rng = np.random.default_rng(1)
    x, q = unit(rng, 3), unit(rng, 60)
    ids = np.array([7, 8, 9])
    qi, hid, dist = all_hits(q, x, ids)
    few = {7: D, 8: D + 1, 9: 60}  # queries each id is seen by
    keep = qi < np.vectorize(few.get)(hid)
    qi, hid, dist = qi[keep], hid[keep], dist[keep]
    # repeating id 7's hits adds no information: still only D distinct queries
    qi, hid, dist = (np.concatenate([a, a[hid == 7]]) for a in (qi, hid, dist))
    est = trilaterate(q, qi, hid, dist)
    assert sorted(est) == [8, 9]
    assert count_recovered(est, ids, x, 1e-4) == 2
    assert trilaterate(q, qi, hid, dist, min_equations=61) == {}


def test_trilateration_skips_rank_deficient_systems():
    rng = np.random.default_rng(2)
    x = unit(rng, 1)
    q = np.zeros((60, D), np.float32)
    q[:, :10] = unit(rng, 60, 10)  # 60 queries, but all in a 10-d subspace
    est = trilaterate(q, *all_hits(q, x, np.array([0])))
    assert est == {}


def test_rounded_distances_are_not_exact_but_still_close():
    """Distances on a 1e-3 grid with only d+1 queries: no unit vector is recovered to 1e-4
    (nor to 1e-3), yet all are within 10%: rounding degrades, it does not protect.
    (With N(0,1) vectors of norm ~7, the same rounding still leaves ~1/4 exact to 1e-4.)"""
    rng = np.random.default_rng(3)
    x, q = unit(rng, 200), unit(rng, D + 1)
    ids = np.arange(200)
    qi, hid, dist = all_hits(q, x, ids)
    est = trilaterate(q, qi, hid, np.round(dist / 1e-3) * 1e-3)
    assert len(est) == 200  # the systems are solvable, the answers are off
    assert count_recovered(est, ids, x, 1e-4) == 0
    assert count_recovered(est, ids, x, 1e-3) == 0
    assert count_recovered(est, ids, x, 1e-1) == 200


def test_trilateration_is_fast_on_100k_hits():
    rng = np.random.default_rng(4)
    x, q = unit(rng, 1000), unit(rng, 2000)
    qi = rng.integers(0, 2000, 100_000)
    hid = rng.integers(0, 1000, 100_000)
    dist = ((q[qi].astype(np.float64) - x[hid]) ** 2).sum(1)
    est = trilaterate(q, qi, hid, dist)
    assert count_recovered(est, np.arange(1000), x, 1e-4) == len(est) == 1000


# -- exposure --------------------------------------------------------------------------


def test_exposure_scan_finds_planted_rows_and_ignores_means():
    rng = np.random.default_rng(5)
    targets = unit(rng, 500, 5)
    means = np.stack([targets[rng.choice(500, 5, replace=False)].mean(0) for _ in range(50)])
    planted = targets[[3, 3, 17, 499]]  # 3 distinct targets, one received twice
    rows = np.concatenate([means, planted, np.zeros((4, 5)), np.full((2, 5), np.nan)])
    assert exposure_scan(rows[rng.permutation(len(rows))], targets, 1e-4) == 3
    assert exposure_scan(means, targets, 1e-4) == 0
    assert exposure_scan(planted * (1 + 1e-3), targets, 1e-4) == 0  # outside the tolerance
    assert exposure_scan(planted * (1 + 1e-3), targets, 1e-2) == 3
    assert exposure_scan(np.zeros((3, 5)), targets, 1.0) == 0


def test_exposure_scan_subspaces_counts_vector_subspace_pairs():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 12)).astype(np.float32)  # M=3, dsub=4
    rows = [rng.standard_normal((20, 4)) for _ in range(3)]
    rows[0] = np.concatenate([rows[0], x[[1, 2], 0:4]])
    rows[2] = np.concatenate([rows[2], x[[1], 8:12]])
    rows[1] = np.concatenate([rows[1], x[[5], 0:4]])  # a sub-vector in the wrong sub-space
    assert exposure_scan_subspaces(rows, x, 1e-5) == 3


def test_small_cells():
    counts = np.array([[0, 1, 2, 3, 10], [4, 0, 1, 100, 5]])
    assert small_cells(counts, 3) == 3
    assert small_cells(counts, 5) == 5
    assert small_cells(counts, 1) == 0


def test_rows_of_reads_fedvec_replies():
    rng = np.random.default_rng(7)
    m, k, dsub = 2, 4, 3
    init = rng.standard_normal((m, 3, dsub))
    sums = rng.standard_normal((m, k, dsub))
    counts = np.array([[1, 0, 2, 4], [0, 0, 3, 1]], np.int32)
    coarse_sums, coarse_counts = rng.standard_normal((1, 2, 6)), np.array([[2, 1]])

    def ex(arrays, config=None, error=None):
        return Exchange("train", 1, {}, config or {}, arrays, {}, error)

    exchanges = [
        ex({"init": {"centroids": init, "counts": np.ones((m, 3))}}, {"init-level": "pq"}),
        ex({"init": {"centroids": rng.standard_normal((1, 2, 6))}}, {"init-level": "coarse"}),
        ex({"codebook-update": {"pq.sums": sums, "pq.counts": counts, "coarse.sums": coarse_sums, "coarse.counts": coarse_counts}}),
        ex({"codebook-update": {"pq.centroids": sums}}, error="boom"),  # error replies don't count
    ]
    pq = rows_of(exchanges, "pq")
    assert [r.shape for r in pq] == [(3 + 3, dsub), (3 + 2, dsub)]
    np.testing.assert_allclose(pq[0][3:], sums[0][[0, 2, 3]] / counts[0][[0, 2, 3], None])
    np.testing.assert_allclose(pq[1][:3], init[1])
    coarse = rows_of(exchanges, "coarse")
    assert [r.shape for r in coarse] == [(2 + 2, 6)]
    assert [r.shape[0] for r in rows_of([], "pq", m=4)] == [0, 0, 0, 0]
    # a client's lone vector in a cell is exposed through sums / counts
    x = np.concatenate([sums[0, 0], rng.standard_normal(dsub)])[None]  # cell (0, 0) has count 1
    assert exposure_scan_subspaces(pq, x, 1e-6) == 1


# -- differencing and federation-wide small cells --------------------------------------


def lloyd_stats(x: np.ndarray, assign: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of one sub-space (M = 1) for a given assignment."""
    sums = np.zeros((1, k, x.shape[1]))
    np.add.at(sums[0], assign, x)
    return sums, np.bincount(assign, minlength=k)[None].astype(np.float64)


def obs(clients, sums, counts, model="m", space="e", batch=0, summed=True) -> Observation:
    return Observation(frozenset(clients), model, (space,), sums, counts, batch, summed)


def test_count_one_rows_reads_plus_and_minus_one():
    sums = np.arange(12, dtype=np.float64).reshape(1, 4, 3)
    rows = count_one_rows(sums, np.array([[1.0, 1.4, -1.0, 2.0]]))
    np.testing.assert_array_equal(rows[0], np.stack([sums[0, 0], sums[0, 1], -sums[0, 2]]))
    assert count_one_rows(sums, np.array([[0.0, 1.6, 5.0, -0.4]]))[0].shape == (0, 3)


def test_set_difference_isolates_one_client_and_its_lone_vectors():
    rng = np.random.default_rng(0)
    a, b, c = (unit(rng, 30, 4) for _ in range(3))
    k = 8
    assign = {name: rng.integers(0, k, x.shape[0]) for name, x in (("a", a), ("b", b), ("c", c))}
    assign["c"][:] = 0
    assign["c"][-1] = 5  # C holds one lone vector in cell 5; A and B have theirs too
    stats = {n: lloyd_stats(x, assign[n], k) for n, x in (("a", a), ("b", b), ("c", c))}
    total = lambda names: tuple(sum(stats[n][i] for n in names) for i in (0, 1))  # noqa: E731
    abc, ab = obs({1, 2, 3}, *total("abc")), obs({1, 2}, *total("ab"), batch=1)
    found = difference_candidates([abc, ab])
    assert len(found) == 1 and found[0][0] == ("e",)
    np.testing.assert_allclose(found[0][1][0], c[-1:])  # exactly C's lone sub-vector
    # another model, another encoder space, or sets that are not nested: nothing to subtract
    assert difference_candidates([abc, obs({1, 2}, *total("ab"), space="other")]) == []
    assert difference_candidates([abc, obs({1, 4}, *total("ab"), model="m")]) == []
    # federation-wide: no cell of A+B+C holds one vector unless C's cell 5 is alone there
    lone = federation_candidates([abc])
    for rows in (r for _, per in lone for r in per):
        assert exposure_scan(rows, np.concatenate([a, b, c]), 1e-9) == rows.shape[0]


def test_same_clients_under_other_codebooks_give_away_the_vector_that_moved():
    rng = np.random.default_rng(1)
    x = unit(rng, 40, 4)
    k = 6
    before = rng.integers(0, k, x.shape[0])
    after = before.copy()
    after[7] = (before[7] + 1) % k  # one vector changes cell between the two codebooks
    s1, s2 = lloyd_stats(x, before, k), lloyd_stats(x, after, k)
    found = difference_candidates([obs({1, 2}, *s1, model="round 1"), obs({1, 2}, *s2, model="round 2", batch=1)])
    rows = np.concatenate([r for _, per in found for r in per[:1]])
    assert rows.shape[0] == 2 and exposure_scan(rows, x, 1e-9) == 1  # + and - of the same vector
    assert exposure_scan(rows, x[7:8], 1e-9) == 1


def test_federation_candidates_add_up_plain_replies_per_request():
    rng = np.random.default_rng(2)
    x = unit(rng, 3, 4)
    k = 4
    one = obs({1}, *lloyd_stats(x[:2], np.array([0, 0]), k), space="e1", summed=False)
    two = obs({2}, *lloyd_stats(x[2:], np.array([1]), k), space="e2", summed=False)
    found = federation_candidates([one, two])  # cell 1 holds x[2] alone, in client 2's space
    assert [(spaces, [r.shape[0] for r in per]) for spaces, per in found] == [(("e2",), [1])]
    np.testing.assert_allclose(found[0][1][0][0], x[2])
    # the same replies as two different requests are two federations: client 1's cell 0 has 2
    assert [sp for sp, _ in federation_candidates([one, obs({2}, two.sums, two.counts, batch=1, space="e2")])] == [("e2",)]
    noisy = obs({1, 2}, one.sums + two.sums + rng.normal(0, 3, one.sums.shape), one.counts + two.counts + rng.normal(0, 3, one.counts.shape))
    assert all(exposure_scan(r, x, 1e-4) == 0 for _, per in federation_candidates([noisy]) for r in per)


def secagg_exchanges(inputs: dict[int, dict[str, np.ndarray]], drop_after_mask: tuple[int, ...] = (), session: str = "s1") -> list[Exchange]:
    """One secure-aggregation session run in memory with fedvec's client functions, as
    the ServerProxy would have recorded it (setup, share, mask, unmask)."""
    roster = sorted(inputs)
    t = threshold_for(len(roster), 0.7)
    limits = secagg_client.Limits(3, 0.7)
    sessions, pub, out = {}, {}, []
    for n in roster:
        sessions[n], pub[n] = secagg_client.start(session, n)
        out.append(Exchange("train", n, {}, {"stage": "setup", "session": session}, reply_values={
            SETUP: {"session": session, **pub[n], "fixed-point-bits": 24}, LAYOUT: dict(layout_record(inputs[n]).items())}, error=None))
    c_pk, s_pk = [pub[n]["c-pk"] for n in roster], [pub[n]["s-pk"] for n in roster]
    asked = {"session": session, "stage": "share", "roster": [str(n) for n in roster], "c-pk": c_pk, "s-pk": s_pk, "threshold": t}
    sent = {u: secagg_client.share_keys(sessions[u], roster, c_pk, s_pk, t, limits) for u in roster}
    out += [Exchange(MESSAGE_TYPE, u, {}, dict(asked), reply_values={"secagg": {"dst": [str(d) for d in sent[u]]}}, error=None) for u in roster]
    survivors = [n for n in roster if n not in drop_after_mask]
    for v in roster:
        senders = [u for u in roster if u != v]
        x, _ = fixed_point.encode(flatten(inputs[v]), 24, len(roster))
        y = secagg_client.mask(sessions[v], senders, [sent[u][v] for u in senders], x)
        out.append(Exchange(MESSAGE_TYPE, v, {}, {"session": session, "stage": "mask"},
                            reply_arrays={"masked": {"y": y}} if v in survivors else {}, error=None if v in survivors else "no reply (timeout)"))
    for u in survivors:
        shares = secagg_client.unmask(sessions[u], survivors)
        out.append(Exchange(MESSAGE_TYPE, u, {}, {"session": session, "stage": "unmask"}, reply_values={"secagg": {
            "peers": [str(p) for p, _, _ in shares], "kinds": [k for _, k, _ in shares], "shares": [b for _, _, b in shares]}}, error=None))
    return out


def test_decoded_secure_sums_rebuild_the_servers_sum_from_the_traffic_alone():
    rng = np.random.default_rng(3)
    inputs = {n: {"codebook.pq.sums": rng.normal(size=(2, 3, 4)), "codebook.pq.counts": rng.integers(0, 9, (2, 3)).astype(np.float64),
                  "clients": np.ones(1)} for n in (11, 22, 33, 44, 55)}
    [decoded] = decoded_secure_sums(secagg_exchanges(inputs, drop_after_mask=(33,)))  # t = 4 of 5: one may drop
    assert decoded.clients == {11, 22, 44, 55} and decoded.session == "s1"
    for key in inputs[11]:
        np.testing.assert_allclose(decoded.arrays[key], sum(inputs[n][key] for n in decoded.clients), atol=1e-6)
    assert decoded.arrays["clients"][0] == 4.0
    # a session that never unmasked gives nothing
    assert decoded_secure_sums([ex for ex in secagg_exchanges(inputs) if ex.sent_config["stage"] != "unmask"]) == []


# -- ServerProxy in a real Flower simulation -------------------------------------------


def test_server_proxy_records_and_rewrites_a_real_simulation():
    client = ClientApp()

    @client.query()
    def answer(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        if cfg.get("fail") and context.node_config["partition-id"] == 1:
            raise ValueError("shard 1 refuses")
        q = msg.content["queries"]["q"].numpy()
        arrays = ArrayRecord({"scaled": Array(q * float(cfg["k"])), "pid": Array(np.array([context.node_config["partition-id"]]))})
        echo = ConfigRecord({"k": cfg["k"], "target": cfg["target"], "node": context.node_id})
        content = RecordDict({"answer": arrays, "echo": echo, "metrics": MetricRecord({"n": q.shape[0]})})
        return Message(content=content, reply_to=msg)

    seen: dict = {}

    def rewrite(msg: Message) -> Message:
        msg.content["config"]["k"] = 50  # the active server asks for more neighbours
        msg.content["config"]["target"] = msg.metadata.dst_node_id  # and a per-node change
        return msg

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        proxy = ServerProxy(grid, rewrite)
        seen["proxy"] = proxy
        deadline = time.time() + 60  # SuperNodes come online after the ServerApp starts
        while len(nodes := sorted(proxy.get_node_ids())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        q = np.arange(6, dtype=np.float32).reshape(2, 3)
        content = RecordDict({"queries": ArrayRecord({"q": Array(q)}), "config": ConfigRecord({"k": 5, "target": -1, "mode.kind": "knn"})})
        seen["replies"] = list(proxy.send_and_receive(
            [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes], timeout=60))
        seen["nodes"] = nodes
        # the push/pull path (and a failing node): exchanges 3 and 4
        content["config"]["fail"] = True
        ids = set(proxy.push_messages([Message(content=content, message_type="query", dst_node_id=n) for n in nodes]))
        while ids and time.time() < deadline:
            ids -= {r.metadata.reply_to_message_id for r in proxy.pull_messages(ids)}
            time.sleep(0.1)
        content["config"]["fail"] = False
        seen["original"] = dict(content["config"])
        seen["run_id"] = proxy.run.run_id  # a Grid attribute, delegated

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": "ERROR", "log_to_driver": True}},
    )

    proxy: ServerProxy = seen["proxy"]
    nodes = seen["nodes"]
    assert len(nodes) == 2 and len(seen["replies"]) == 2
    assert seen["original"] == {"k": 5, "target": -1, "mode.kind": "knn", "fail": False}  # the server's own content: untouched
    assert isinstance(seen["run_id"], int)
    assert len(proxy.exchanges) == 4
    assert [ex.batch for ex in proxy.exchanges] == [0, 0, 1, 1]  # one send_and_receive, one push
    first, second = proxy.exchanges[:2], proxy.exchanges[2:]
    assert proxy.replies("query") == proxy.replies() == first + [e for e in second if e.error is None]
    assert proxy.replies("train") == []
    failed = [e for e in second if e.error is not None]
    assert len(failed) == 1 and "shard 1 refuses" in failed[0].error and failed[0].reply_arrays == {}
    assert sorted(ex.node for ex in first) == sorted(ex.node for ex in second) == nodes
    for ex in proxy.replies():
        assert ex.message_type == MessageType.QUERY
        assert ex.sent_config == {"k": 50, "target": ex.node, "mode.kind": "knn", **({"fail": True} if ex in second else {})}
        np.testing.assert_array_equal(ex.sent_arrays["queries"]["q"], np.arange(6).reshape(2, 3))
        np.testing.assert_array_equal(ex.reply_arrays["answer"]["scaled"], 50 * np.arange(6).reshape(2, 3))
        assert ex.reply_values["echo"] == {"k": 50, "target": ex.node, "node": ex.node}
        assert ex.reply_values["metrics"] == {"n": 2}
    assert sorted(int(ex.reply_arrays["answer"]["pid"][0]) for ex in first) == [0, 1]
