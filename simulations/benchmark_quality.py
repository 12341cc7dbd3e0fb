"""Quality benchmark: federated PQ vs centralized faiss PQ, side by side from one sweep.

    python -m simulations.benchmark_quality                 # GloVe 100k, PQ 10x8, 10 rounds
    python -m simulations.benchmark_quality --out bench/q --clients 10 --partitions iid

Runs one Hydra multirun (``simulations.run -m``) over strategy x partition x clients
with the encoder off (plain PQ: identity encoder, no local epochs), plus the default
encoder (rotation, lambda from conf) with federated Lloyd, then prints per setting:
centralized 10-R@10, every strategy's federated 10-R@10 and its ratio to centralized.
Targets checked: federated Lloyd >= 0.99 x centralized everywhere, and it beats both
baselines on non-IID shards. Exit code 1 if a target is missed or a run failed.

It measures the algorithms, not the privacy protections: every run uses
``privacy=secagg`` (exact sums, through secure aggregation), the setting under which
the averaging baselines run at all; the cost of DP is ``benchmark_privacy --dp``'s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from simulations.report import load_rows

TARGET_RATIO = 0.99
FEDERATED = "fedlloyd"
BASELINES = ("avg_refined", "avg_independent")
PLAIN_PQ = ("train.lam=0", "train.gamma=0", "train.local_epochs=0")


def sweep(out: Path, overrides: list[str]) -> int:
    cmd = [sys.executable, "-m", "simulations.run", "-m", f"hydra.sweep.dir={out}", *overrides]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _setting(row: dict[str, Any]) -> tuple[str, int]:
    o = row["_overrides"]
    return o.get("partition", "iid"), int(o.get("num_clients", 10))


def table(plain: list[dict[str, Any]], encoder: list[dict[str, Any]], strategies: list[str]) -> tuple[str, list[str]]:
    """The side-by-side table and the list of missed targets."""
    cells: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in plain:
        cells.setdefault(_setting(row), {})[row["_overrides"].get("strategy", FEDERATED)] = row
    for row in encoder:
        cells.setdefault(_setting(row), {})["encoder"] = row
    cols = [*strategies, *(["encoder"] if encoder else [])]
    head = ["partition", "clients", "central 10-R@10", *[f"{c} 10-R@10 (x central)" for c in cols], "fedlloyd distortion / central"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    missed = []
    for (part, n), runs in sorted(cells.items()):
        ok = [r for r in runs.values() if r["status"] == "ok"]
        central = ok[0]["central_recall_10_at_10"] if ok else None
        row = [part, str(n), f"{central:.4f}" if central else "-"]
        for c in cols:
            r = runs.get(c)
            if r is None or r["status"] != "ok":
                row.append("failed" if r else "-")
                if r:
                    missed.append(f"{part}/{n}/{c}: run {r['status']} ({r['error']})")
                continue
            row.append(f"{r['fed_recall_10_at_10']:.4f} ({r['fed_recall_10_at_10'] / central:.3f})")
        fed = runs.get(FEDERATED)
        if fed and fed["status"] == "ok":
            row.append(f"{fed['fed_distortion']:.4f} / {fed['central_distortion']:.4f}")
            ratio = fed["fed_recall_10_at_10"] / central
            if ratio < TARGET_RATIO:
                missed.append(f"{part}/{n}: fedlloyd 10-R@10 is {ratio:.3f} x centralized < {TARGET_RATIO}")
            if part != "iid":
                for b in BASELINES:
                    if b in runs and runs[b]["status"] == "ok" and runs[b]["fed_recall_10_at_10"] >= fed["fed_recall_10_at_10"]:
                        missed.append(f"{part}/{n}: baseline {b} is not beaten")
        else:
            row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), missed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmark_quality"))
    ap.add_argument("--clients", default="10,50")
    ap.add_argument("--partitions", default="iid,dirichlet")
    ap.add_argument("--strategies", default=",".join((FEDERATED, *BASELINES)))
    ap.add_argument("--no-encoder", action="store_true", help="skip the encoder rows")
    ap.add_argument("--report-only", action="store_true", help="re-print the table of an earlier run in --out")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. num_rounds=5")
    args = ap.parse_args(argv)
    grid = [f"num_clients={args.clients}", f"partition={args.partitions}", "privacy=secagg", *args.overrides]
    failed = []
    if not args.report_only:
        if sweep(args.out / "plain_pq", [f"strategy={args.strategies}", *grid, *PLAIN_PQ]):
            failed.append("the plain-PQ sweep exited non-zero (see its log above)")
        if not args.no_encoder and sweep(args.out / "encoder", [f"strategy={FEDERATED}", *grid]):
            failed.append("the encoder sweep exited non-zero (see its log above)")
    plain = load_rows(args.out / "plain_pq") if (args.out / "plain_pq").is_dir() else []
    encoder = [] if args.no_encoder or not (args.out / "encoder").is_dir() else load_rows(args.out / "encoder")
    text, missed = table(plain, encoder, args.strategies.split(","))
    missed = failed + missed + ([] if plain else ["no runs to compare"])
    print("\nfederated vs centralized faiss (same M, nbits), final round; 'encoder' = fedlloyd + rotation encoder\n")
    print(text)
    print("\n" + ("all targets met" if not missed else "MISSED:\n  " + "\n  ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
