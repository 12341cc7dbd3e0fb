"""Central differential privacy on secure-aggregated sums, with distributed noise.

The unit of privacy is one vector of one shard (add or remove it). Every release is a
Gaussian mechanism on a group of summed arrays with known L2 sensitivities: each client
clips what one of its vectors can contribute, and adds its share of the noise,
N(0, sigma^2 / t) per entry, where t is the session's threshold: any t surviving
clients together add at least the full sigma, so no party (the server included) ever
sees a noise-free statistic.

A release of G arrays with sensitivities D_g uses sigma_g = z * D_g * sqrt(G): the joint
mechanism then has noise multiplier exactly z. Epsilon over all releases is composed by
``dp-accounting``'s RDP accountant (PLD is tighter but took minutes to calibrate); a client calibrates z so that its own maximum number
of releases stays within its own epsilon, and refuses any release beyond that number.
"""

from __future__ import annotations

import math
import secrets
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import dp_accounting


# dp_accounting (scipy) is imported where it is used: a ClientApp adding its noise share
# in a secure-aggregation stage needs none of it (a fresh process per message in deployment)


def _gaussians(multipliers: list[float]) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in multipliers])


def epsilon_spent(multipliers: list[float], delta: float) -> float:
    """Epsilon of the composition of Gaussian releases with these noise multipliers."""
    if not multipliers:
        return 0.0
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(_gaussians(multipliers))
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=32)
def noise_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """The z for which ``releases`` Gaussian releases compose to (epsilon, delta)."""
    if not (epsilon > 0 and 0 < delta < 1 and releases >= 1):
        raise ValueError(f"DP needs epsilon > 0, 0 < delta < 1 and releases >= 1, got {epsilon}, {delta}, {releases}")
    import dp_accounting
    from dp_accounting import rdp

    z = dp_accounting.calibrate_dp_mechanism(rdp.RdpAccountant, lambda z: _gaussians([z] * releases), epsilon, delta)
    return float(z)


def noise_stds(sensitivity: dict[str, float], z: float) -> dict[str, float]:
    """Per-array std of the total noise for one release with noise multiplier z."""
    sensitive = [k for k, d in sensitivity.items() if d > 0]
    scale = z * math.sqrt(len(sensitive))
    return {k: (scale * d if d > 0 else 0.0) for k, d in sensitivity.items()}


def add_noise_share(stats: dict[str, np.ndarray], stds: dict[str, float], threshold: int) -> dict[str, np.ndarray]:
    """This client's share of the release's noise: std sigma / sqrt(t) per entry, drawn
    from OS entropy (a seed the server could know would let it subtract the noise)."""
    rng = np.random.default_rng(secrets.randbits(128))
    out = {}
    for k, v in stats.items():
        v = np.asarray(v, dtype=np.float64)
        sigma = float(stds.get(k, 0.0))
        out[k] = v + rng.normal(0.0, sigma / math.sqrt(threshold), v.shape) if sigma > 0 else v
    return out


def clip_rows(x: np.ndarray, norm: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most ``norm`` (one vector's contribution)."""
    n = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x * np.minimum(1.0, norm / np.maximum(n, 1e-30))).astype(x.dtype)
