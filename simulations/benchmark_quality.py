"""Quality benchmark: federated PQ vs centralized faiss PQ, side by side from one sweep.

    python -m simulations.benchmark_quality                 # GloVe 100k, PQ 10x8, 10 rounds
    python -m simulations.benchmark_quality --out bench/q --clients 10 --partitions iid
    python -m simulations.benchmark_quality --index rq num_rounds=30 eval.every=30   # additive rows

Runs one Hydra multirun (``simulations.run -m``) over strategy x partition x clients
with the encoder off (plain PQ: identity encoder, no local epochs), plus the default
encoder (rotation, lambda from conf) with federated Lloyd, then prints per setting:
centralized 10-R@10, every strategy's federated 10-R@10 and its ratio to centralized.
Targets checked: federated Lloyd >= 0.99 x centralized everywhere, and it beats both
baselines on non-IID shards. Exit code 1 if a target is missed or a run failed.

``--index rq,lsq`` instead benchmarks the additive quantizers (issue 14): fedlloyd
(one exact codebook update per round) per index x partition x clients, against faiss's
RQ/LSQ and OPQ trained centrally on the pooled base, all at the same bytes per vector,
with train time, encoding throughput and search QPS measured here, side by side.

It measures the algorithms, not the privacy protections: every run uses
``privacy=secagg`` (exact sums, through secure aggregation), the setting under which
the averaging baselines run at all; the cost of DP is ``benchmark_privacy --dp``'s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def timed_index(index, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, with_ids: bool = False) -> dict[str, float]:
    """Encode the base into ``index`` and search it: throughputs beside the recall."""
    from vector_index.topk import recall_report

    t = time.perf_counter()
    if with_ids:  # a shard's index takes user ids
        index.add_with_ids(base, np.arange(base.shape[0], dtype=np.int64))
    else:
        index.add(base)
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    _, found = index.search(queries, k)
    search_s = time.perf_counter() - t
    return {"encode_vps": base.shape[0] / encode_s, "qps": queries.shape[0] / search_s, **recall_report(found, truth)}


def central_rows(kinds: list[str], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """faiss's own index of each kind (and OPQ at the same M, nbits) trained on the pooled base."""
    from fed_app.config import compose_config, load_experiment
    from fed_app.local_data import load_dataset
    from fed_app.simulator_truth import exact_neighbours
    from vector_index.quantizers import train_reference_index

    out = {}
    for kind in [*kinds, "opqpq"]:
        exp = load_experiment(compose_config([f"index={kind}", *overrides]))
        data = load_dataset(exp.data)
        spec = exp.index.resolved(data.base.shape[1]).spec
        truth = exact_neighbours(data, exp.eval.k)
        t = time.perf_counter()
        index = train_reference_index(spec, data.base, exp.seed, add=False)
        train_s = time.perf_counter() - t
        out[kind] = {"factory": spec.factory_string(), "train_s": train_s, "bytes": spec.code_size(data.base.shape[1]),
                     **timed_index(index, data.base, data.queries, truth, exp.eval.k)}
        print(f"central {spec.factory_string()}: {json.dumps(out[kind])}", flush=True)
    return out


def federated_speed(row: dict[str, Any], root: Path) -> dict[str, float]:
    """The run's global model injected into a shard's faiss index: encoding and search speed."""
    from fed_app.config import compose_config, load_experiment
    from fed_app.local_data import load_dataset
    from fed_app.simulator_truth import exact_neighbours
    from vector_index.quantizers import empty_index, with_transform

    run = root / row["run"]
    summary = json.loads((run / "summary.json").read_text())
    exp = load_experiment(compose_config(row["overrides"].split() if row["overrides"] else []))
    data = load_dataset(exp.data)
    spec = exp.index.resolved(data.base.shape[1]).spec
    model = np.load(summary["global_model"])
    books = {level: model[f"codebook.{level}"] for level in spec.levels}
    index = with_transform(empty_index(spec, data.base.shape[1], books), model["transform.A"], model["transform.b"])
    return timed_index(index, data.base, data.queries, exact_neighbours(data, exp.eval.k), exp.eval.k, with_ids=True)


def additive_table(rows: list[dict[str, Any]], central: dict[str, dict[str, Any]], root: Path) -> tuple[str, list[str]]:
    """Federated RQ/LSQ per setting vs central same kind and central OPQ, with speeds."""
    head = ["index", "partition", "clients", "fed 10-R@10", "central same kind", "fed / central", "fed / central OPQ",
            "fed wall s / central train s", "encode vec/s fed / central", "QPS fed / central"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    missed = []
    opq = central["opqpq"]
    for row in sorted(rows, key=lambda r: (r["_overrides"].get("index", ""), *_setting(r))):
        kind = row["_overrides"].get("index")
        part, n = _setting(row)
        if row["status"] != "ok":
            missed.append(f"{kind}/{part}/{n}: run {row['status']} ({row['error']})")
            lines.append(f"| {kind} | {part} | {n} | failed | | | | | | |")
            continue
        c = central[kind]
        speed = federated_speed(row, root)
        fed = row["fed_recall_10_at_10"]
        ratio, wall = fed / c["recall_10_at_10"], row["wall_time_s"] / c["train_s"]
        lines.append(f"| {kind} | {part} | {n} | {fed:.4f} | {c['recall_10_at_10']:.4f} ({c['factory']}) | {ratio:.3f} | "
                     f"{fed / opq['recall_10_at_10']:.3f} | {row['wall_time_s']:.0f} / {c['train_s']:.0f} = {wall:.2f} | "
                     f"{speed['encode_vps']:.0f} / {c['encode_vps']:.0f} | {speed['qps']:.0f} / {c['qps']:.0f} |")
        if ratio < 1.0:
            missed.append(f"{kind}/{part}/{n}: federated 10-R@10 is {ratio:.3f} x centralized {c['factory']} < 1.00")
        if wall > 1.0:
            missed.append(f"{kind}/{part}/{n}: federated wall time is {wall:.2f} x centralized training > 1.0")
    lines.append(f"| central OPQ | | | | {opq['recall_10_at_10']:.4f} ({opq['factory']}, train {opq['train_s']:.0f} s, "
                 f"{opq['encode_vps']:.0f} vec/s, {opq['qps']:.0f} QPS) | | | | | |")
    return "\n".join(lines), missed


def main_additive(args: argparse.Namespace) -> int:
    kinds = args.index.split(",")
    out = args.out / "additive"
    grid = [f"index={args.index}", f"num_clients={args.clients}", f"partition={args.partitions}", "strategy=fedlloyd",
            "privacy=secagg", "eval.centralized=false", *args.overrides]
    failed = []
    if not args.report_only and sweep(out, [*grid, *([] if args.encoder_on else PLAIN_PQ)]):
        failed.append("the additive sweep exited non-zero (see its log above)")
    central = central_rows(kinds, [o for o in args.overrides])
    text, missed = additive_table(load_rows(out) if out.is_dir() else [], central, out)
    (out / "central.json").write_text(json.dumps(central, indent=1))
    print("\nfederated additive quantizers vs faiss trained centrally on the pooled base (same bytes per vector), final round\n")
    print(text)
    missed = failed + missed
    print("\n" + ("all targets met" if not missed else "MISSED:\n  " + "\n  ".join(missed)))
    return 1 if missed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmark_quality"))
    ap.add_argument("--clients", default="10,50")
    ap.add_argument("--partitions", default="iid,dirichlet")
    ap.add_argument("--strategies", default=",".join((FEDERATED, *BASELINES)))
    ap.add_argument("--no-encoder", action="store_true", help="skip the encoder rows")
    ap.add_argument("--report-only", action="store_true", help="re-print the table of an earlier run in --out")
    ap.add_argument("--index", help="additive kinds to benchmark instead (e.g. rq,lsq): fedlloyd vs central faiss RQ/LSQ and OPQ")
    ap.add_argument("--encoder-on", action="store_true", help="with --index: keep conf's encoder training (default: plain quantizer)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. num_rounds=5")
    args = ap.parse_args(argv)
    if args.index:
        return main_additive(args)
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
