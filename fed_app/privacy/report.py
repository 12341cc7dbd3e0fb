"""``final.privacy`` in summary.json: the protections in force, said plainly.

A figure is only honest beside the protections it was measured under, so this names
the evaluation protocol, the limits the nodes said they enforce (in deployment each
SuperNode's own), the initialisation, what nodes withheld, and what is not (yet) on.
"""

from __future__ import annotations

from typing import Any

WEAKEST = {"min-count": min, "max-k": max, "max-range-results": max, "query-budget": max, "distance-grid": min, "examples-digits": max}


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


def privacy_summary(cfg: dict[str, Any], strategy: Any, init_withheld: dict[int, str], public_vectors: int) -> dict[str, Any]:
    protocol = str(cfg["eval"]["protocol"])
    warnings = []
    if protocol == "trusted":
        warnings.append("eval.protocol=trusted: shards returned exact distances to the evaluation queries (simulation research mode)")
    limits = weakest_limits(strategy.node_policies)
    if limits.get("min-count", 5) < 2:
        warnings.append("min-count < 2: single vectors can leave a client as centroids or Lloyd cells")
    if cfg["init"]["source"] == "public":
        init = f"public vectors ({public_vectors}, {cfg['init'].get('public_path') or 'the held-out queries'}); no client statistics"
    elif cfg["strategy"]["flower"]["codebook_update"] == "local":
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
        "secure_aggregation": False,
        "differential_privacy": {"on": False, "epsilon": None, "delta": None},
        "visible_to_server": [
            "each client's Lloyd sums and counts over cells with >= min-count vectors",
            "each client's encoder weights after local training",
            "each client's shard size, rounded to examples-digits significant digits",
            "each client's mean distortion and its own held-out recall estimate",
        ],
        "warnings": warnings,
    }
