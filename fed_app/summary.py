"""The result contract: summary.json, rounds.csv and a readable final table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

TABLE_KEYS = (
    ("distortion", "distortion"),
    ("1-R@1", "recall_1_at_1"),
    ("1-R@10", "recall_1_at_10"),
    ("10-R@10", "recall_10_at_10"),
)


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
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def final_table(final: dict[str, Any]) -> str:
    cols = ["federated"] + (["centralized"] if "centralized" in final else [])
    lines = [f"{'metric':<34}" + "".join(f"{c:>14}" for c in cols)]
    for label, key in TABLE_KEYS:
        lines.append(f"{label:<34}" + "".join(f"{final[c].get(key, float('nan')):>14.4f}" for c in cols))
    lines.append(f"{'bytes per vector':<34}{final['bytes_per_vector']:>14}")
    lines.append(f"{'bytes up per client per round':<34}{final['bytes_up_per_client_per_round']:>14.0f}")
    return "\n".join(lines)
