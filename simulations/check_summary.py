"""Check a run's summary.json against the result contract (used by CI and tests).

    python -m simulations.check_summary outputs/.../summary.json [--centralized]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RECALLS = ("recall_10_at_10", "recall_1_at_1")


def problems(summary: dict, centralized: bool, provenance: bool = True) -> list[str]:
    """What breaks the result contract. ``provenance``: also require ``final.privacy``
    and ``final.federated.source`` (summaries written before they existed lack them)."""
    out = []
    final = summary.get("final", {})
    sides = ["federated"] + (["centralized"] if centralized else [])
    for side in sides:
        for key in (*RECALLS, "distortion"):
            v = final.get(side, {}).get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                out.append(f"final.{side}.{key} missing or not a number: {v!r}")
            elif key in RECALLS and not 0 <= v <= 1:
                out.append(f"final.{side}.{key}={v} outside [0, 1]")
    for key in ("bytes_per_vector", "bytes_up_per_client_per_round"):
        if not isinstance(final.get(key), (int, float)):
            out.append(f"final.{key} missing")
    rounds = summary.get("rounds")
    # under DP a deployed federation evaluates once, after the last round (one release)
    dp_estimate = final.get("privacy", {}).get("differential_privacy", {}).get("on") and not str(
        final.get("federated", {}).get("source", "")).startswith("simulator")
    every = int(summary.get("config", {}).get("eval", {}).get("every", 1))  # rounds between evaluations
    if not rounds or any("round" not in r for r in rounds) or "distortion" not in rounds[-1] or (
            not dp_estimate and any("distortion" not in r for r in rounds if r["round"] % every == 0)):
        out.append("rounds[] missing or an evaluated round lacks round/distortion")
    if "config" not in summary:
        out.append("config missing")
    if not provenance:
        return out
    privacy = final.get("privacy")
    if not isinstance(privacy, dict) or "eval_protocol" not in privacy or "differential_privacy" not in privacy:
        out.append("final.privacy missing (the protections in force)")
    if not final.get("federated", {}).get("source"):
        out.append("final.federated.source missing (simulator truth or the federation's estimate)")
    if centralized and not final.get("centralized", {}).get("source"):
        out.append("final.centralized.source missing (trained in the run or read from the reference cache)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path", type=Path)
    ap.add_argument("--centralized", action="store_true", help="require final.centralized.* too")
    args = ap.parse_args()
    if not args.path.is_file():
        print(f"no summary at {args.path}", file=sys.stderr)
        return 1
    found = problems(json.loads(args.path.read_text()), args.centralized)
    for p in found:
        print(f"summary.json: {p}", file=sys.stderr)
    if not found:
        print(f"{args.path}: valid")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
