"""``final.privacy`` in summary.json: the protections in force, said plainly.

A figure is only honest beside the protections it was measured under, so this names
the evaluation protocol, the limits the nodes said they enforce (in deployment each
SuperNode's own), the initialisation, what nodes withheld, and what is not (yet) on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .dp import epsilon_spent

if TYPE_CHECKING:
    from ..experiment import Experiment

WEAKEST = {"min-count": min, "max-k": max, "max-range-results": max, "query-budget": max, "distance-grid": min, "examples-digits": max,
           "max-local-epochs": max, "max-kmeans-iters": max}


def weakest_limits(node_policies: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The loosest value of each limit over the nodes: what the federation guarantees."""
    if not node_policies:
        return {}
    out: dict[str, Any] = {}
    for key, pick in WEAKEST.items():
        values = [p[key] for p in node_policies.values() if key in p]
        if values:
            out[key] = pick(values)
    digits = [p["examples-digits"] for p in node_policies.values() if "examples-digits" in p]
    if digits and 0 in digits:
        out["examples-digits"] = 0  # 0 means exact: the loosest of all
    out["allow-trusted-eval"] = any(bool(p.get("allow-trusted-eval")) for p in node_policies.values())
    return out


def privacy_summary(cfg: Experiment, strategy: Any, init_withheld: dict[int, str], public_vectors: int) -> dict[str, Any]:
    protocol = cfg.eval.protocol
    warnings = []
    if protocol == "trusted":
        warnings.append("eval.protocol=trusted: shards returned exact distances to the evaluation queries (simulation research mode)")
    limits = weakest_limits(strategy.node_policies)
    if limits.get("min-count", 5) < 2:
        warnings.append("min-count < 2: single vectors can leave a client as centroids or Lloyd cells")
    secure = cfg.privacy.limits.secure_aggregation
    if not secure:
        warnings.append(f"privacy={cfg.privacy.name}: each client's statistics reached the server unmasked (research simulation only)")
    if cfg.init.source == "public":
        init = f"public vectors ({public_vectors}, {cfg.init.public_path or 'the held-out queries'}); no client statistics"
    elif cfg.codebook_update == "local":
        init = "none: every shard trains its own codebooks, which never leave it"
    else:
        init = "clients: local centroids supported by >= min-count vectors, counts rounded (k-FED style)"
    return {
        "eval_protocol": protocol,
        "node_limits": limits,
        "node_limits_by_node": {str(n): p for n, p in sorted(strategy.node_policies.items())},
        "limits_source": sorted({str(p.get("source", "?")) for p in strategy.node_policies.values()}),
        "init": init,
        "search_distances": "computed on compressed codes, rounded to each node's distance-grid; raw-vector indexes refuse search",
        "withheld": {
            "init": {str(n): why for n, why in sorted(init_withheld.items())},
            **{f"round_{r}": {str(n): why for n, why in sorted(nodes.items())} for r, nodes in sorted(strategy.withheld.items())},
        },
        "secure_aggregation": secure,
        "differential_privacy": differential_privacy(cfg, strategy),
        "baselines": BASELINES,
        "visible_to_server": visible_to_server(cfg),
        "warnings": warnings,
    }


BASELINES = {
    "fedlloyd/fedprox/fedadam/fedyogi": "secure aggregation; DP on every sum (encoder by federated Procrustes under DP)",
    "init_only": "no codebook statistics after the public init; encoder as fedlloyd",
    "local_only": "codebooks never leave the shard; encoder statistics as fedlloyd",
    "avg_refined/avg_independent": "secure aggregation of n_k * centroids (privacy=secagg); refused under DP: no per-vector bound",
}


def differential_privacy(cfg: Experiment, strategy: Any) -> dict[str, Any]:
    """Epsilon over the noisy sums that actually happened, composed by dp-accounting.

    Each release counts with the smallest noise multiplier any summed node stated: the
    guarantee holds as long as the session's threshold of honest clients added theirs.
    """
    p = cfg.privacy.limits
    if not p.dp:
        return {"on": False, "epsilon": None, "delta": None}
    delta = p.dp_delta
    releases = list(getattr(strategy, "releases", []))
    return {
        "on": True,
        "epsilon": round(epsilon_spent([r["noise_multiplier"] for r in releases], delta), 4),
        "delta": delta,
        "epsilon_budget": p.dp_epsilon,
        "max_releases": p.dp_max_releases,
        "releases": releases,
        "unit": "one vector of one shard (add/remove)",
        "clip_l2": p.dp_clip,
        "mechanism": "Gaussian on every summed array, noise shared among clients (each adds sigma^2/t), inside secure aggregation",
        "accountant": "dp-accounting RDP (ComposedDpEvent of GaussianDpEvent)",
    }


def visible_to_server(cfg: Experiment) -> list[str]:
    p = cfg.privacy.limits
    if p.secure_aggregation:
        out = ["each client's public keys and the shapes of its statistics; masked inputs (uniform in Z_2^64)",
               "sums over at least secagg_threshold of the round's roster: Lloyd sums and counts, encoder statistics, evaluation sums",
               "which nodes took part in, or dropped out of, each sum", "each client's stated limits and noise multiplier"]
        if p.dp:
            out[1] += ", each with Gaussian noise (DP)"
        return out
    return [
        "each client's Lloyd sums and counts over cells with >= min-count vectors",
        "each client's encoder weights after local training",
        "each client's shard size, rounded to examples-digits significant digits",
        "each client's mean distortion and its own held-out recall estimate",
    ]
