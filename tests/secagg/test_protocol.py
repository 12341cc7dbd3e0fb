"""Secure aggregation as pure functions: the sum is exact, masked inputs look uniform,
clients refuse what their own limits forbid, and too few survivors abort cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fed_app.secagg import client, fixed_point, server, shamir

LIMITS = client.Limits(min_clients=3, threshold=0.6)


def run_session(inputs: dict[int, np.ndarray], drop_after_keys=(), drop_after_mask=(), fraction=0.6, session="s1"):
    """All four stages in memory; returns the unmasked sum and the masked inputs."""
    sessions, pub = {}, {}
    for node in inputs:
        sessions[node], pub[node] = client.start(session, node)
    roster = sorted(inputs)
    t = server.threshold_for(len(roster), fraction)
    c_pk, s_pk = [pub[n]["c-pk"] for n in roster], [pub[n]["s-pk"] for n in roster]
    sent = {u: client.share_keys(sessions[u], roster, c_pk, s_pk, t, LIMITS) for u in roster if u not in drop_after_keys}
    u2 = sorted(sent)
    masked = {}
    for v in u2:
        senders = [u for u in u2 if u != v]
        y = client.mask(sessions[v], senders, [sent[u][v] for u in senders], inputs[v])
        if v not in drop_after_mask:
            masked[v] = y
    survivors = sorted(masked)
    revealed = {u: client.unmask(sessions[u], survivors) for u in survivors}
    dropped = [v for v in u2 if v not in masked]
    return server.unmask_sum(session, roster, s_pk, t, masked, revealed, dropped), masked, sessions


def encoded(rng, n_clients, length=257):
    values = {node: rng.normal(0, 100, length) for node in rng.choice(2**62, n_clients, replace=False).tolist()}
    return values, {node: fixed_point.encode(v, 24, n_clients)[0] for node, v in values.items()}


def test_sum_is_exact_without_dropouts():
    values, inputs = encoded(np.random.default_rng(0), 6)
    total, masked, _ = run_session(inputs)
    assert np.array_equal(total, np.sum(list(inputs.values()), axis=0, dtype=np.uint64))
    assert np.allclose(fixed_point.decode(total, 24), np.sum(list(values.values()), axis=0), atol=6 * 2**-24)
    assert all(not np.array_equal(masked[n], inputs[n]) for n in masked)


@pytest.mark.parametrize("after_keys, after_mask", [(1, 0), (0, 2), (1, 1)])
def test_sum_is_exact_with_dropouts_up_to_the_threshold(after_keys, after_mask):
    _, inputs = encoded(np.random.default_rng(1), 7)  # t = ceil(0.6 * 7) = 5: two may drop
    nodes = sorted(inputs)
    gone_keys, gone_mask = nodes[:after_keys], nodes[after_keys: after_keys + after_mask]
    total, masked, _ = run_session(inputs, gone_keys, gone_mask)
    assert sorted(masked) == nodes[after_keys + after_mask:]
    assert np.array_equal(total, np.sum([inputs[n] for n in masked], axis=0, dtype=np.uint64))


def test_below_the_threshold_the_session_aborts():
    _, inputs = encoded(np.random.default_rng(2), 5)  # t = 3
    nodes = sorted(inputs)
    with pytest.raises(client.ProtocolError, match="below the threshold 3: refusing to unmask"):
        run_session(inputs, drop_after_mask=nodes[:3])
    with pytest.raises(client.ProtocolError, match=r"only 2 of the roster shared keys, below the threshold 3"):
        run_session(inputs, drop_after_keys=nodes[:3])


def test_server_aborts_when_too_few_shares_come_back():
    _, inputs = encoded(np.random.default_rng(3), 5)
    sessions, pub = {}, {}
    for node in inputs:
        sessions[node], pub[node] = client.start("s", node)
    roster = sorted(inputs)
    c_pk, s_pk = [pub[n]["c-pk"] for n in roster], [pub[n]["s-pk"] for n in roster]
    sent = {u: client.share_keys(sessions[u], roster, c_pk, s_pk, 3, LIMITS) for u in roster}
    masked = {v: client.mask(sessions[v], [u for u in roster if u != v], [sent[u][v] for u in roster if u != v], inputs[v]) for v in roster}
    revealed = {u: client.unmask(sessions[u], roster) for u in roster[:2]}  # three never answer
    with pytest.raises(server.Aborted, match="only 2 client"):
        server.unmask_sum("s", roster, s_pk, 3, masked, revealed, [])


def test_one_masked_input_is_indistinguishable_from_uniform():
    """A constant input (all zeros) comes out masked: its bytes and its top bits pass
    chi-square tests of uniformity, and it is uncorrelated with the input."""
    inputs = {n: np.zeros(20_000, dtype=np.uint64) for n in (11, 22, 33)}
    inputs[11][:] = np.uint64(12345)
    _, masked, _ = run_session(inputs)
    y = masked[11]
    counts = np.bincount(y.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    top = np.bincount((y >> np.uint64(60)).astype(np.int64), minlength=16)
    assert stats.chisquare(top).pvalue > 1e-3
    assert len(np.unique(y)) == y.size  # no repeated value, as for 64-bit uniform draws


def _keyed(nodes):
    sessions, pub = {}, {}
    for node in nodes:
        sessions[node], pub[node] = client.start("s", node)
    return sessions, [pub[n]["c-pk"] for n in nodes], [pub[n]["s-pk"] for n in nodes]


@pytest.mark.parametrize(
    "roster_size, threshold, match",
    [(5, 2, "threshold 2 of 5 is below this node's minimum 3"), (2, 2, "below this node's secagg-min-clients=3"), (5, 6, "threshold 6 of 5")],
)
def test_client_refuses_a_roster_or_threshold_its_limits_forbid(roster_size, threshold, match):
    nodes = list(range(1, roster_size + 1))
    sessions, c_pk, s_pk = _keyed(nodes)
    with pytest.raises(client.ProtocolError, match=match):
        client.share_keys(sessions[1], nodes, c_pk, s_pk, threshold, LIMITS)


def test_client_refuses_a_roster_with_someone_elses_key_for_it():
    nodes = [1, 2, 3, 4]
    sessions, c_pk, s_pk = _keyed(nodes)
    s_pk[0] = s_pk[1][:-1] + bytes([s_pk[1][-1] ^ 1])
    with pytest.raises(client.ProtocolError, match="not its own"):
        client.share_keys(sessions[1], nodes, c_pk, s_pk, 3, LIMITS)


def test_client_never_reveals_both_secrets_of_a_peer_nor_unmasks_twice():
    _, inputs = encoded(np.random.default_rng(4), 5)
    nodes = sorted(inputs)
    _, masked, sessions = run_session(inputs)
    assert sessions[nodes[0]].stage == "done"
    with pytest.raises(client.ProtocolError, match="out of order"):
        client.unmask(sessions[nodes[0]], nodes[1:])  # a second ask, now calling nodes[0]'s peers dropped


def test_forged_shares_are_refused():
    nodes = [1, 2, 3]
    sessions, c_pk, s_pk = _keyed(nodes)
    sent = {u: client.share_keys(sessions[u], nodes, c_pk, s_pk, 3, LIMITS) for u in nodes}
    with pytest.raises(client.ProtocolError, match="do not decrypt"):
        client.mask(sessions[1], [2, 3], [sent[2][1], sent[3][2]], np.zeros(4, dtype=np.uint64))


def test_fixed_point_refuses_nan_and_clips_to_the_bound():
    with pytest.raises(fixed_point.EncodingError, match="NaN or infinite"):
        fixed_point.encode(np.array([1.0, np.nan]), 24, 3)
    big = fixed_point.bound(24, 3) * 10
    enc, clipped = fixed_point.encode(np.array([big, -big, 1.5]), 24, 3)
    assert clipped == 2
    assert fixed_point.decode(enc, 24)[2] == 1.5
    assert abs(fixed_point.decode(np.sum([enc] * 3, axis=0, dtype=np.uint64), 24)[0]) < 2.0**62 / 2**24 + 1  # no wrap


def test_shamir_recovers_from_any_threshold_subset_only():
    secret = bytes(range(32))
    shares = shamir.split(secret, 4, 7)
    assert shamir.combine(shares[3:]) == secret and shamir.combine([shares[i] for i in (0, 2, 4, 6)]) == secret
    with pytest.raises(ValueError):
        shamir.combine(shares[:3])  # below the threshold: a random field element, not the secret
