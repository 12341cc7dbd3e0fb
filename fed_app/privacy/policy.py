"""A client's own privacy limits, and the checks every request passes through.

The limits come from where the server cannot reach: a deployed SuperNode's
``--node-config`` (``min-count=5 max-k=100 ...``), with ``conf/privacy/secure.yaml`` for
keys it does not set; or, in ``python -m simulations.run``, the simulator's own
``privacy`` group handed to the ClientApp in-process. A request beyond a limit is
refused with a reply naming the limit: never silently obeyed, never silently truncated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf

from vector_index.model_checks import ModelBounds

if TYPE_CHECKING:
    from ..experiment import Experiment

DEFAULTS_FILE = Path(__file__).resolve().parents[2] / "conf" / "privacy" / "secure.yaml"
BUDGET_RECORD = "privacy-budget"  # Context.state record: queries answered so far in this run
RELEASES_RECORD = "dp-releases"  # Context.state record: noisy sums taken part in so far in this run
FLOAT_FIELDS = ("distance_grid", "secagg_threshold", "dp_epsilon", "dp_delta", "dp_clip", "model_max_gain", "model_orthogonal_tol", "model_norm_slack")


class Refusal(Exception):
    """A request this client will not answer; ``limit`` names the limit it exceeds."""

    def __init__(self, limit: str, reason: str) -> None:
        super().__init__(reason)
        self.limit, self.reason = limit, reason


@lru_cache(maxsize=1)
def _shipped_defaults() -> tuple[tuple[str, Any], ...]:
    """The node defaults file, read once per process (a node builds its policy per message)."""
    return tuple(dict(OmegaConf.to_container(OmegaConf.load(DEFAULTS_FILE))).items())  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClientPolicy:
    """What a client enforces; see conf/privacy/secure.yaml for the meaning of each."""

    min_count: int
    max_k: int
    max_range_results: int
    query_budget: int
    distance_grid: float
    examples_digits: int
    model_max_gain: float = 100.0
    model_orthogonal_tol: float = 1e-3
    model_norm_slack: float = 4.0
    max_local_epochs: int = 10
    max_kmeans_iters: int = 100
    secure_aggregation: bool = True
    secagg_min_clients: int = 3
    secagg_threshold: float = 0.7
    fixed_point_bits: int = 24
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-6
    dp_max_releases: int = 1
    dp_clip: float = 1.0
    allow_trusted_eval: bool = False  # exact per-query distances: simulated data only
    source: str = "defaults"

    def __post_init__(self) -> None:
        for name in ("min_count", "max_k", "max_range_results", "query_budget", "secagg_min_clients", "dp_max_releases", "max_local_epochs", "max_kmeans_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self._key(name)}: must be an integer >= 1, got {value!r} (from {self.source})")
        if isinstance(self.examples_digits, bool) or not isinstance(self.examples_digits, int) or self.examples_digits < 0:
            raise ValueError(f"{self._key('examples_digits')}: must be an integer >= 0, got {self.examples_digits!r} (from {self.source})")
        g = self.distance_grid
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"{self._key('distance_grid')}: must be a number >= 0, got {g!r} (from {self.source})")
        if not isinstance(self.secure_aggregation, bool):
            raise ValueError(f"{self._key('secure_aggregation')}: must be true or false, got {self.secure_aggregation!r} (from {self.source})")
        checks = {
            "secagg_threshold": (lambda v: 0.5 < v <= 1, "a fraction in (0.5, 1]"),
            "fixed_point_bits": (lambda v: 8 <= v <= 40, "an integer in [8, 40]"),
            "dp_epsilon": (lambda v: v >= 0, "a number >= 0 (0: no noise)"),
            "dp_delta": (lambda v: 0 < v < 1, "a number in (0, 1)"),
            "dp_clip": (lambda v: v > 0, "a number > 0"),
            "model_max_gain": (lambda v: v >= 1, "a number >= 1"),
            "model_orthogonal_tol": (lambda v: 0 < v < 1, "a number in (0, 1)"),
            "model_norm_slack": (lambda v: v >= 1, "a number >= 1"),
        }
        for name, (ok, what) in checks.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{self._key(name)}: must be {what}, got {v!r} (from {self.source})")
        if self.dp_epsilon > 0 and not self.secure_aggregation:
            raise ValueError(f"{self._key('dp_epsilon')}: distributed DP noise needs secure aggregation (each client adds only a share of it)")

    @property
    def model_bounds(self) -> ModelBounds:
        return ModelBounds(float(self.model_max_gain), float(self.model_orthogonal_tol), float(self.model_norm_slack))

    @property
    def dp(self) -> bool:
        return self.dp_epsilon > 0

    def noise_multiplier(self) -> float:
        """z for this client's own epsilon over its own maximum number of releases."""
        from .dp import noise_multiplier

        return noise_multiplier(float(self.dp_epsilon), float(self.dp_delta), int(self.dp_max_releases))

    def spend_release(self, used: int) -> int:
        if used + 1 > self.dp_max_releases:
            raise Refusal(
                "dp-max-releases",
                f"this node has taken part in its dp-max-releases={self.dp_max_releases} noisy sums for this run; "
                f"one more would exceed its epsilon={self.dp_epsilon}",
            )
        return used + 1

    def _key(self, name: str) -> str:
        """How the user spells this limit where it came from: node config or conf/."""
        return _node_key(name) if self.source.startswith("node") else f"privacy.{name}"

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str, allow_trusted_eval: bool = False) -> "ClientPolicy":
        known = {f.name for f in fields(cls)} - {"source", "allow_trusted_eval"}
        return cls(**{k: values[k] for k in known}, allow_trusted_eval=allow_trusted_eval, source=source)

    @classmethod
    def for_simulation(cls, cfg: "Experiment") -> "ClientPolicy":
        """The simulated clients' own limits: the experiment's ``privacy`` group, held by
        the simulator (never sent); they answer the trusted protocol only when the
        experiment itself is run with it."""
        return replace(cfg.privacy.limits, source=f"simulator (privacy={cfg.privacy.name})", allow_trusted_eval=cfg.eval.protocol == "trusted")

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> "ClientPolicy":
        """A SuperNode's limits: its node config over the shipped defaults.

        Only a node without a ``shard-dir`` (its data is the simulation's, rebuilt from
        what the server sends) answers the trusted evaluation protocol.
        """
        values = dict(_shipped_defaults())
        set_here = []
        for name in (f.name for f in fields(cls) if f.name in values):
            key = _node_key(name)
            if key in node_config:
                values[name] = _parse(name, node_config[key])
                set_here.append(key)
        source = "node config (" + ", ".join(set_here) + ")" if set_here else "node defaults (conf/privacy/secure.yaml)"
        if "shard-dir" in node_config and not values["secure_aggregation"]:
            raise ValueError(
                "secure-aggregation=false: a SuperNode with a shard-dir sends its statistics only through secure "
                "aggregation (the trusted protocol is for simulations); remove secure-aggregation from its node config"
            )
        return cls.from_mapping(values, source, allow_trusted_eval="shard-dir" not in node_config)

    def as_record(self) -> dict[str, float | int | str]:
        """What a client tells the server about its limits (they are not secret)."""
        return {_node_key(f.name): (int(v) if isinstance(v, bool) else v) for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def check_work(self, local_epochs: int, kmeans_iters: int) -> None:
        """The work a server may ask of this node per message: bounded here, whatever it sends."""
        if local_epochs > self.max_local_epochs:
            raise Refusal("max-local-epochs", f"train.local_epochs={local_epochs} exceeds this node's max-local-epochs={self.max_local_epochs}")
        if kmeans_iters > self.max_kmeans_iters:
            raise Refusal("max-kmeans-iters", f"init.kmeans_iters={kmeans_iters} exceeds this node's max-kmeans-iters={self.max_kmeans_iters}")

    def check_k(self, k: int) -> None:
        if k > self.max_k:
            raise Refusal("max-k", f"k={k} exceeds this node's max-k={self.max_k}")

    def check_candidates(self, rerank: int) -> None:
        """A node examines at most max-k candidates per query, re-ranking included."""
        if rerank > self.max_k:
            raise Refusal("max-k", f"rerank={rerank} candidates per query exceed this node's max-k={self.max_k}")

    def check_range(self, lims: np.ndarray) -> None:
        """Refuse a range query whose result set exceeds the limit (no truncation)."""
        sizes = np.diff(lims)
        if sizes.size and int(sizes.max()) > self.max_range_results:
            q = int(sizes.argmax())
            raise Refusal(
                "max-range-results",
                f"the range query returns {int(sizes.max())} results for query {q}, more than this node's max-range-results={self.max_range_results}",
            )

    def round_distances(self, d: np.ndarray) -> np.ndarray:
        """Distances on the configured grid (padding stays as it was)."""
        if self.distance_grid <= 0:
            return d
        g = self.distance_grid
        real = np.abs(d) < np.finfo(np.float32).max  # faiss pads with FLT_MAX (and id -1)
        on_grid = np.round(np.where(real, d, 0).astype(np.float64) / g) * g
        return np.where(real, on_grid, d).astype(d.dtype)

    def round_counts(self, counts: np.ndarray) -> np.ndarray:
        """Sizes or weights the server needs only roughly, to ``examples_digits``
        significant digits (a shard's exact size is nobody else's business)."""
        return round_significant(np.asarray(counts, dtype=np.float64), self.examples_digits)

    def round_examples(self, n: int) -> float:
        return float(self.round_counts(np.asarray([n]))[0])

    def spend(self, used: int, queries: int) -> int:
        """New count of answered queries, or a refusal if the budget would be exceeded."""
        if used + queries > self.query_budget:
            raise Refusal(
                "query-budget",
                f"{queries} more queries would exceed this node's query-budget={self.query_budget} for this run ({used} answered so far)",
            )
        return used + queries

    def with_overrides(self, **changes: Any) -> "ClientPolicy":
        return replace(self, **changes)


def round_significant(x: np.ndarray, digits: int) -> np.ndarray:
    """Round non-negative values to ``digits`` significant digits (0 keeps them exact)."""
    if digits <= 0:
        return x
    x = np.asarray(x, dtype=np.float64)
    mag = np.floor(np.log10(np.where(x > 0, x, 1.0)))
    scale = 10.0 ** (mag - digits + 1)
    return np.where(x > 0, np.round(x / scale) * scale, x)


def _node_key(name: str) -> str:
    return name.replace("_", "-")


def _parse(name: str, value: Any) -> Any:
    """Node-config values arrive typed from TOML-like syntax; accept ints for floats."""
    if name in FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
