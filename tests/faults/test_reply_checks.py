"""Every kind of broken or hostile training, evaluation and init reply is refused by
the server with a reason a user can act on; an honest reply passes (unit level; the
whole run is tests/faults/test_hostile_clients.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fed_app import client_tasks
from fed_app.config import compose_config, load_experiment
from fed_app.settings import client_view
from fed_app.encoder import initial_weights
from fed_app.federation import public_init
from fed_app.local_data import client_shard, load_dataset
from fed_app.model_guard import max_norm
from fed_app.privacy.policy import ClientPolicy
from fed_app.reply_checks import Expected, InvalidReply, evaluate_reply, init_reply, train_reply
from fed_app.state import GlobalState, encoder_record, record_of


@pytest.fixture(scope="module")
def honest():
    cfg = load_experiment(compose_config([*TINY, "privacy=trusted", "model=affine"]))
    view = client_view(cfg, **{"server-round": 1})
    data = load_dataset(cfg.data)
    state = GlobalState(encoder=initial_weights(data.base.shape[1], "affine"))
    public_init(state, cfg.index.spec, cfg, data)
    pol = ClientPolicy.for_simulation(cfg)
    x, ids = client_shard(view, 0, cfg.num_clients)
    weights, update, metrics = client_tasks.train(state, x, view, pol)
    evaluation = client_tasks.evaluate(state, x, ids, view, pol)
    p = cfg.privacy.limits
    exp = Expected(cfg.index.spec, data.base.shape[1], state.encoder, state.codebooks, "lloyd", max_norm(data.queries),
                   p.model_bounds, p.examples_digits, p.min_count)
    return exp, weights, update, metrics, evaluation


def reply(weights, update, metrics, drop=()):
    content = {"arrays": encoder_record(weights), "codebook-update": record_of(update), "metrics": MetricRecord(metrics)}
    return RecordDict({k: v for k, v in content.items() if k not in drop})


def test_an_honest_reply_passes(honest):
    exp, weights, update, metrics, evaluation = honest
    got, n = train_reply(reply(weights, update, metrics), exp)
    assert n == metrics["num-examples"] and set(got) == {"pq.sums", "pq.counts"}
    evaluate_reply(RecordDict({"metrics": MetricRecord(evaluation)}), exp)


def _nan(u, m, w):
    u["pq.sums"][0, 0, 0] = np.nan


def _huge(u, m, w):
    u["pq.sums"] *= 1e30


def _negative(u, m, w):
    u["pq.counts"][1, 2] = -7


def _float_counts(u, m, w):
    u["pq.counts"] = u["pq.counts"].astype(np.float32)


def _truncated(u, m, w):
    u["pq.sums"] = u["pq.sums"][:, :-1]


def _missing_key(u, m, w):
    del u["pq.counts"]


def _many(u, m, w):
    m["num-examples"] = 1e12


def _below_zero(u, m, w):
    m["num-examples"] = -3.0


def _sum_without_count(u, m, w):
    empty = np.argwhere(u["pq.counts"] == 0)
    j, c = empty[0] if len(empty) else (0, 0)
    u["pq.counts"][j, c] = 0
    u["pq.sums"][j, c] = 0.5


def _not_a_rotation_of_bounded_gain(u, m, w):
    w["linear.weight"] = w["linear.weight"] * 1e4


@pytest.mark.parametrize("corrupt, match", [
    (_nan, r"array 'pq\.sums' holds NaN"),
    (_huge, r"pq\.sums: a cell's sum exceeds its count"),
    (_negative, r"pq\.counts: negative counts"),
    (_float_counts, r"array 'pq\.counts' has dtype float32, expected integers"),
    (_truncated, r"array 'pq\.sums' has shape \(4, 63, 4\), expected \(4, 64, 4\)"),
    (_missing_key, r"codebook-update holds \['pq\.sums'\], expected \['pq\.counts', 'pq\.sums'\]"),
    (_many, r"num-examples=1e\+12 is more than pq\.counts account for"),
    (_below_zero, r"num-examples must be an integer >= 1, got -3\.0"),
    (_sum_without_count, r"pq\.sums: a cell's sum exceeds its count"),
    (_not_a_rotation_of_bounded_gain, r"encoder: singular values span"),
])
def test_each_hostile_training_reply_is_refused_with_its_reason(honest, corrupt, match):
    exp, weights, update, metrics, _ = honest
    u, m, w = {k: v.copy() for k, v in update.items()}, dict(metrics), {k: v.copy() for k, v in weights.items()}
    corrupt(u, m, w)
    with pytest.raises(InvalidReply, match=match):
        train_reply(reply(w, u, m), exp)


@pytest.mark.parametrize("drop, match", [(("codebook-update",), "no 'codebook-update' record"), (("arrays",), "no encoder record"),
                                         (("metrics",), "no metrics record")])
def test_a_reply_missing_a_record_is_refused(honest, drop, match):
    exp, weights, update, metrics, _ = honest
    with pytest.raises(InvalidReply, match=match):
        train_reply(reply(weights, update, metrics, drop), exp)


@pytest.mark.parametrize("key, value, match", [
    ("distortion", float("nan"), "distortion must be in"), ("energy", 1e30, "energy must be in"),
    ("estimate.recall_10_at_10", 1.5, r"estimate\.recall_10_at_10 must be in \[0, 1\]"),
    ("num-examples", 0.5, "num-examples must be an integer"), ("estimate.queries", 1e9, "estimate.queries=1e\\+09 exceeds"),
])
def test_each_hostile_evaluation_reply_is_refused(honest, key, value, match):
    exp, *_, evaluation = honest
    with pytest.raises(InvalidReply, match=match):
        evaluate_reply(RecordDict({"metrics": MetricRecord({**evaluation, key: value})}), exp)


def test_hostile_init_replies_are_refused(honest):
    exp, *_ = honest
    shape = exp.spec.level_shape("pq", exp.dim)
    good = {"centroids": np.zeros((shape[0], 5, shape[2]), np.float32), "counts": np.full((shape[0], 5), 9, np.int32)}
    init_reply(RecordDict({"init": record_of(good)}), shape, exp.data_norm, 0.0, "pq", exp.bounds)
    for bad, match in [({**good, "centroids": good["centroids"] + 1e20}, "a centroid's norm exceeds"),
                       ({**good, "counts": -good["counts"]}, "negative counts"),
                       ({**good, "centroids": good["centroids"][:, :, :2]}, r"init centroids: shape")]:
        with pytest.raises(InvalidReply, match=match):
            init_reply(RecordDict({"init": record_of(bad)}), shape, exp.data_norm, 0.0, "pq", exp.bounds)
    with pytest.raises(InvalidReply, match="no 'init' record"):
        init_reply(RecordDict({"x": ArrayRecord()}), shape, exp.data_norm, 0.0, "pq", exp.bounds)


def _answer(**arrays):
    return RecordDict({"results": record_of(arrays)})


def test_search_answers_are_checked():
    from fed_app.reply_checks import search_reply

    d, i = np.sort(np.random.default_rng(0).random((3, 5)).astype(np.float32), axis=1), np.arange(15).reshape(3, 5)
    search_reply(_answer(distances=d, ids=i), 3, 5, ("",))
    search_reply(_answer(distances=d[:, :2], ids=i[:, :2]), 3, 5, ("",))  # a small shard has fewer hits
    for bad, match in [(dict(distances=d[:2], ids=i[:2]), r"shape \(2, 5\), expected \(3, <= 5\)"),
                       (dict(distances=np.where(d > 0.5, np.nan, d), ids=i), "must not be NaN"),
                       (dict(distances=d, ids=i - 5), "ids must be >= -1"),
                       (dict(distances=d, ids=i.astype(np.float32)), "ids integers"),
                       (dict(distances=d), "lack distances / ids")]:
        with pytest.raises(InvalidReply, match=match):
            search_reply(_answer(**bad), 3, 5, ("",))
    lims = np.array([0, 2, 2, 5])
    search_reply(_answer(lims=lims, distances=d.ravel()[:5], ids=i.ravel()[:5]), 3, None, ("",))
    with pytest.raises(InvalidReply, match="lims must be 4 non-decreasing"):
        search_reply(_answer(lims=np.array([0, 3, 2, 5]), distances=d.ravel()[:5], ids=i.ravel()[:5]), 3, None, ("",))
