"""Central DP: epsilon is dp-accounting's for the same mechanism, the calibration meets
its target, the per-array noise makes the joint release a Gaussian mechanism with the
stated multiplier, and the clients' noise shares add up to it."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import scipy.linalg
from dp_accounting import pld, rdp

from fed_app.config import ConfigError, compose_config, validate
from fed_app.privacy import dp
from fed_app.privacy.policy import ClientPolicy, Refusal
from fed_app.secure_statistics import relaxed_procrustes


@pytest.mark.parametrize("z, releases", [(2.29, 11), (0.9, 3), (5.0, 40)])
def test_epsilon_matches_dp_accountings_reference(z, releases):
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), releases))
    assert dp.epsilon_spent([z] * releases, 1e-6) == pytest.approx(reference.get_epsilon(1e-6), rel=1e-9)
    tight = pld.PLDAccountant()  # RDP is an upper bound on the tight (PLD) epsilon
    tight.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), releases))
    assert tight.get_epsilon(1e-6) <= dp.epsilon_spent([z] * releases, 1e-6) + 1e-9


def test_heterogeneous_releases_compose():
    mixed = dp.epsilon_spent([2.0, 3.0, 3.0], 1e-5)
    assert dp.epsilon_spent([3.0] * 3, 1e-5) < mixed < dp.epsilon_spent([2.0] * 3, 1e-5)
    assert dp.epsilon_spent([], 1e-5) == 0.0


@pytest.mark.parametrize("epsilon, releases", [(8.0, 11), (1.0, 11), (4.0, 3)])
def test_calibrated_multiplier_meets_the_target(epsilon, releases):
    z = dp.noise_multiplier(epsilon, 1e-6, releases)
    assert dp.epsilon_spent([z] * releases, 1e-6) == pytest.approx(epsilon, rel=1e-3)
    assert dp.epsilon_spent([z * 0.98] * releases, 1e-6) > epsilon  # no slack left


def test_noise_stds_make_the_joint_release_exactly_z():
    sens = {"sums": 1.0, "counts": math.sqrt(10), "cross": 1.0, "clients": 0.0}
    stds = dp.noise_stds(sens, 2.5)
    assert stds["clients"] == 0.0
    assert 1 / math.sqrt(sum((sens[k] / stds[k]) ** 2 for k in sens if sens[k] > 0)) == pytest.approx(2.5)


def test_noise_shares_of_t_clients_add_up_to_sigma():
    stds = {"a": 3.0}
    t = 5
    total = sum(dp.add_noise_share({"a": np.zeros(200_000)}, stds, t)["a"] for _ in range(t))
    assert total.std() == pytest.approx(3.0, rel=0.01)
    again = dp.add_noise_share({"a": np.zeros(8)}, stds, t)["a"]
    assert not np.array_equal(again, dp.add_noise_share({"a": np.zeros(8)}, stds, t)["a"])  # OS entropy, no fixed seed


def test_clip_rows():
    x = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)
    out = dp.clip_rows(x, 1.0)
    assert np.allclose(np.linalg.norm(out, axis=1), [1.0, 0.5]) and out.dtype == np.float32


def _policy(**changes) -> ClientPolicy:
    values = dict(compose_config([])["privacy"])
    values.update(changes)
    return ClientPolicy.from_mapping(values, "test")


def test_release_budget_is_the_clients_own():
    p = _policy(dp_max_releases=2)
    assert p.spend_release(p.spend_release(0)) == 2
    with pytest.raises(Refusal, match="dp-max-releases=2"):
        p.spend_release(2)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"secagg_threshold": 0.5}, r"privacy\.secagg_threshold: must be a fraction in \(0.5, 1\]"),
        ({"dp_delta": 0.0}, r"privacy\.dp_delta"),
        ({"dp_clip": -1.0}, r"privacy\.dp_clip"),
        ({"fixed_point_bits": 60}, r"privacy\.fixed_point_bits"),
        ({"secure_aggregation": False}, r"distributed DP noise needs secure aggregation"),
    ],
)
def test_bad_secure_settings_name_the_key(changes, match):
    with pytest.raises(ValueError, match=match):
        _policy(**changes)


def test_a_supernode_with_a_shard_refuses_the_trusted_protocol():
    with pytest.raises(ValueError, match="secure-aggregation=false: a SuperNode with a shard-dir"):
        ClientPolicy.from_node_config({"shard-dir": "/x", "secure-aggregation": False, "dp-epsilon": 0})
    assert ClientPolicy.from_node_config({"secure-aggregation": False, "dp-epsilon": 0}).secure_aggregation is False  # simulated


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["init.source=clients"], r"^init\.source: clients \(k-FED\)"),
        (["strategy=avg_refined"], r"^strategy: avg_refined averages locally trained codebooks"),
        (["model=affine"], r"^model: under DP the encoder moves by federated Procrustes"),
        (["num_rounds=11"], r"^num_rounds: 11 rounds \+ the final evaluation are 12 noisy releases"),
        (["num_clients=2"], r"^num_clients: 2 clients are fewer than privacy\.secagg_min_clients=3"),
        (["train.procrustes_step=0"], r"^train\.procrustes_step: must be > 0"),
    ],
)
def test_config_refuses_what_secure_aggregation_or_dp_cannot_do(overrides, match):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=match):
        validate(cfg, 50, 100_000)


def test_secagg_and_trusted_allow_what_dp_refuses():
    validate(compose_config(["privacy=secagg", "strategy=avg_refined"]), 50, 100_000)
    validate(compose_config(["privacy=trusted", "init.source=clients", "model=affine"]), 50, 100_000)


def test_relaxed_procrustes_is_a_rotation_with_the_planted_rotation_as_fixed_point():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    planted = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    cross = (x @ planted.T).T @ x  # sum_i q_i x_i^T with q_i = R* x_i
    assert np.allclose(relaxed_procrustes(cross, np.eye(8), 1.0), planted, atol=1e-5)  # the plain step solves it
    assert np.allclose(relaxed_procrustes(cross, planted, 4.0), planted, atol=1e-5)  # nothing to improve: stays
    a = rng.normal(size=(8, 8))
    near = scipy.linalg.expm(0.02 * (a - a.T))  # a small true move from the identity
    small = (x @ near.T).T @ x + rng.normal(size=(8, 8)) * 20  # noisy, as under DP
    plain, moved = relaxed_procrustes(small, np.eye(8), 1.0), relaxed_procrustes(small, np.eye(8), 4.0)
    assert np.allclose(moved @ moved.T, np.eye(8), atol=1e-5)
    assert np.linalg.norm(moved - np.eye(8)) > 2 * np.linalg.norm(plain - np.eye(8))  # it steps past P, away from R
