"""The result contract: summary.json, rounds.csv and a readable final table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

RUN_FILES = ("summary.json", "failed.json", "timing.json", "rounds.csv", "global_model.npz", "shards", "checkpoint.json")  # what a run writes


class DirtyRunDir(ValueError):
    """The output directory already holds a run: a new one would mix with it."""


def check_fresh_run_dir(out_dir: Path) -> None:
    """Refuse a directory that holds an earlier run's results (before anything is written)."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found:
        raise DirtyRunDir(
            f"{out_dir} already holds a run ({', '.join(found)}); a new run would overwrite or mix with it: "
            "choose a fresh directory (Hydra's default outputs/<date>/<time>, or another hydra.run.dir) or remove this one"
        )


def json_safe(obj: Any) -> Any:
    """NaN and infinity as null: they are not JSON, and a reader would choke on them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj

TABLE_KEYS = (
    ("distortion", "distortion"),
    ("1-R@1", "recall_1_at_1"),
    ("1-R@10", "recall_1_at_10"),
    ("10-R@10", "recall_10_at_10"),
)


def write_failure(out_dir: Path, exc: BaseException, status: str, **context: Any) -> Path:
    """failed.json: why a run ended without a summary (``status``: failed / interrupted)."""
    import traceback

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "failed.json"
    record = {**context, "status": status, "error_type": type(exc).__name__, "message": str(exc),
              "traceback": "".join(traceback.format_exception(exc))}
    path.write_text(json.dumps(json_safe(record), indent=2, default=str))
    return path


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = summary["rounds"]
    keys = sorted({k for r in rounds for k in r}, key=lambda k: (k != "round", k))
    with open(out_dir / "rounds.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rounds)
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(summary), indent=2, sort_keys=True, allow_nan=False))
    tmp.replace(path)
    return path


def final_table(final: dict[str, Any]) -> str:
    """Federated (truth in simulation), the federation's private estimate, centralized."""
    cols = [("federated", "federated")]
    if final.get("federated_estimate", {}).get("source") != final["federated"].get("source"):
        cols.append(("private estimate", "federated_estimate"))
    if "centralized" in final:
        cols.append(("centralized", "centralized"))
    lines = [f"{'metric':<34}" + "".join(f"{label:>18}" for label, _ in cols)]
    for label, key in TABLE_KEYS:
        lines.append(f"{label:<34}" + "".join(f"{final[c].get(key, float('nan')):>18.4f}" for _, c in cols))
    lines.append(f"{'bytes per vector':<34}{final['bytes_per_vector']:>18}")
    lines.append(f"{'bytes up per client per round':<34}{final['bytes_up_per_client_per_round']:>18.0f}")
    lines.append(f"federated figures from the {final['federated'].get('source', '?')}")
    if "privacy" in final:
        p = final["privacy"]
        limits = ", ".join(f"{k}={v}" for k, v in p["node_limits"].items())
        dp = p["differential_privacy"]
        lines.append(f"privacy: eval.protocol={p['eval_protocol']}; node limits {limits or 'unknown'}; "
                     f"secure aggregation {'on' if p['secure_aggregation'] else 'off'}; "
                     f"DP {'epsilon=%s delta=%s' % (dp['epsilon'], dp['delta']) if dp['on'] else 'off'}")
        lines += [f"privacy WARNING: {w}" for w in p["warnings"]]
    return "\n".join(lines)
