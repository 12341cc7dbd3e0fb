"""Privacy benchmark: what an attacking server recovers, protections on vs off, and what
the protections cost in recall, from one invocation.

    python -m simulations.benchmark_privacy                       # GloVe, the measured tables
    python -m simulations.benchmark_privacy --quick               # tiny synthetic data, a smoke test
    python -m simulations.benchmark_privacy --out docs/results/privacy --runs /tmp/privacy-runs

Table 1, attacks by setting. Real Flower simulations in which the server is the attack
suite's attacker (``simulations.attack_suite.run_setting``): it records everything it
receives and, after training, probes the clients itself. Each setting runs with the
protections on (the defaults) and off (``eval.protocol=trusted privacy=off``, the
protocol as it was before them). Cells are raw vectors recovered exactly (within 0.1%
of their norm) and the share of the base, with the nodes that refused an attack and the
limit they named.

Table 2, utility. Plain runs (``simulations.run.simulate``, no attacker) on the default
data (GloVe 100k, 2k queries, 10 rounds, rotation encoder): protections on, off, and
on with ``init.source=public``; true 10-R@10 (the simulator's, over the union), the
federation's private estimate and its error, bytes, wall time.

Writes ``<out>/benchmark_privacy.md`` (the tables) and ``<out>/benchmark_privacy.json``
(every raw number); each run's own directory goes under ``--runs`` (default
``<out>/runs``). Exit code 1 if an attack recovers a raw vector under the defaults, a
run failed, or the on/off recall ratio misses the target.

``--dp``: the cost of secure aggregation and DP instead (tables 3-4; 32 runs, about two
hours on 2 cores shared with other jobs, the 200-client secure-aggregation run alone a
quarter of an hour; not in the default invocation, ``--all`` runs tables 3-4 then 1-2):

    python -m simulations.benchmark_privacy --dp --runs /tmp/dp-runs                   # GloVe 100k, every run
    python -m simulations.benchmark_privacy --dp --runs /tmp/dp-runs --max-minutes 20  # no new run after 20 min of runs
    python -m simulations.benchmark_privacy --dp --runs /tmp/dp-runs --reuse           # finished runs read back, the rest run
    python -m simulations.benchmark_privacy --dp --quick                               # tiny synthetic data, a smoke test

Runs go in order of use, so a run cut short by ``--max-minutes`` still has the targets'
figures: the secure-aggregation timings, then the default setting (IID, 10 clients) at
no DP and epsilon 8, its ``train.lam=0`` pair, the rest of its curve, then the other
settings. ``--reuse --max-minutes 0`` only redraws the tables and the plot.

Table 3, privacy/utility. True 10-R@10 (simulator) against the DP budget epsilon in
{1, 2, 4, 8, 16} (``privacy=secure privacy.dp_epsilon=E``) and without DP
(``privacy=secagg``), for {IID, Dirichlet} x {10, 50} clients, 10 rounds; the ratio to
the no-DP run of the same setting and the epsilon the accountant reports as spent
(``final.privacy.differential_privacy.epsilon``). One more pair, ``train.lam=0`` at
epsilon 8 vs no DP (IID, 10 clients), separates the noise from the DP encoder (federated
Procrustes under DP; the torch rotation encoder otherwise).

Table 4, the cost of secure aggregation: median seconds per training round (differences
of ``rounds[].elapsed_s``) and bytes up per client per round, ``privacy=secagg`` vs
``privacy=trusted`` at 10, 50 and 200 clients (3 rounds; 200 clients on a 20k base), the
two arms run alternately so both see the same machine load.

Writes ``<out>/benchmark_dp.md``, ``<out>/benchmark_dp.json`` (every raw number, rewritten
after every run) and ``<out>/privacy_utility.png`` (``simulations.report.plot_privacy_utility``).
Targets: at epsilon 8 true 10-R@10 >= 0.97x the no-DP run (every setting); secure
aggregation round time <= 1.5x plain at 50 clients. Exit code 1 if a run failed or a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fed_app.config import compose_config
from simulations.attack_suite import (
    HUGE_RADIUS,
    NUM_PROBES,
    RAISED_K,
    SEARCH_K,
    BUDGET_BATCHES,
    AttackReport,
    rewrite_to_raise_k,
    run_setting,
)
from simulations.run import simulate

TARGET_RATIO = 0.99
REPRO_TOL = 0.005  # an "off" run reproduces the old figure within this (absolute 10-R@10)
TRAINING_REWRITE_K = 10_000
UNPROTECTED = ["eval.protocol=trusted", "privacy=off"]

# -- the settings ------------------------------------------------------------------------

ATTACK_DATA = ["data=glove", "data.num_base=20000", "data.num_queries=200", "eval.centralized=false"]
ATTACK_SETTINGS = {  # name -> (overrides, active probes?)
    "(a) 50 clients Dirichlet, 3 rounds, active probes": (
        ["num_clients=50", "partition=dirichlet", "num_rounds=3"], True),
    "(b) 200 clients Dirichlet, 1 round, no probes": (
        ["num_clients=200", "partition=dirichlet", "num_rounds=1", "save_shards=false"], False),
}
UTILITY_SETTINGS = {  # name -> overrides (GloVe 100k, 2k queries, everything else default)
    "iid, 10 clients": ["partition=iid", "num_clients=10"],
    "dirichlet, 10 clients": ["partition=dirichlet", "num_clients=10"],
    "dirichlet, 50 clients": ["partition=dirichlet", "num_clients=50"],
}
OLD_FIGURES = {  # 10-R@10 of the protocol before the protections (issue 9)
    "iid, 10 clients": 0.5247,
    "dirichlet, 10 clients": 0.5254,
    "dirichlet, 50 clients": 0.5080,
}

# --quick: tiny synthetic data (as tests/privacy's BASE / SMALL)
QUICK_DATA = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6",
              "init.local_k=64"]
QUICK_ATTACK_SETTINGS = {
    "(a) 20 clients Dirichlet 0.3, 2 rounds, active probes": (
        ["num_clients=20", "partition=dirichlet", "partition.alpha=0.3", "partition.num_clusters=20", "num_rounds=2",
         "eval.centralized=false"], True),
    "(b) 200 clients Dirichlet, 1 round, no probes": (
        ["num_clients=200", "partition=dirichlet", "partition.num_clusters=20", "num_rounds=1", "eval.centralized=false",
         "save_shards=false"], False),
}
QUICK_UTILITY_SETTINGS = {
    "iid, 10 clients": ["partition=iid", "num_clients=10", "num_rounds=2"],
    "dirichlet, 10 clients": ["partition=dirichlet", "partition.num_clusters=20", "num_clients=10", "num_rounds=2"],
    "dirichlet, 20 clients": ["partition=dirichlet", "partition.num_clusters=20", "num_clients=20", "num_rounds=2"],
}
VARIANTS = {  # utility variants: name -> extra overrides
    "on (defaults)": [],
    "off (trusted, privacy=off)": UNPROTECTED,
    "on, init.source=public": ["init.source=public"],
}

SUBVECTOR_ROWS = ("exposure_subvectors", "difference_subvectors", "federation_cells_subvectors")  # counted over N x M
ATTACK_ROWS = {  # AttackReport.recovered key -> row label
    "trilateration_training": "trilateration of every distance received in training",
    "exposure_subvectors": "exposure scan: encoded sub-vectors among received rows",
    "exposure_full_vectors": "exposure scan: whole encoded vectors among init centroids",
    "difference_subvectors": "differencing sums across rounds and leave-one-out sums: lone sub-vectors",
    "federation_cells_subvectors": "federation-wide count-1 cells: sub-vectors",
    "raised_k": f"eval path, raised k={RAISED_K} (trusted protocol asked)",
    "crafted_probes": f"eval path, {NUM_PROBES} crafted probe queries (trusted protocol asked)",
    "search_raised_k": f"search, k={RAISED_K}",
    "search_radius": f"search, radius {HUGE_RADIUS:g}",
    "search_probes": f"search, {NUM_PROBES} probes within limits (k={SEARCH_K})",
    "exhaust_budget": f"search, {BUDGET_BATCHES}x{NUM_PROBES} probes (query budget)",
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _load() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# -- table 1: attacks ----------------------------------------------------------------------


def run_attacks(settings: dict[str, tuple[list[str], bool]], data: list[str], runs: Path) -> list[dict[str, Any]]:
    """Every setting with protections on and off; one result dict per run."""
    results = []
    for i, (name, (overrides, probe)) in enumerate(settings.items()):
        for mode in ("on", "off"):
            ov = [*data, *overrides, *(UNPROTECTED if mode == "off" else [])]
            # the active server also rewrites eval.k / eval.protocol during training, as the test does
            rewrite = rewrite_to_raise_k(TRAINING_REWRITE_K) if mode == "on" and probe else None
            out_dir = runs / f"attack-{i}-{mode}"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            entry: dict[str, Any] = {"setting": name, "mode": mode, "overrides": ov, "probe": probe,
                                     "training_rewrite": f"eval.k={TRAINING_REWRITE_K}, eval.protocol=trusted" if rewrite else None,
                                     "out_dir": str(out_dir), "started": _now(), "load_before": _load()}
            print(f"\n[benchmark_privacy] attacks: {name}, protections {mode}  (load {entry['load_before']})", flush=True)
            print("[benchmark_privacy]   overrides:", " ".join(ov), flush=True)
            t0 = time.perf_counter()
            try:
                report = run_setting(f"{name}, {mode}", ov, out_dir, rewrite=rewrite, probe=probe)
            except Exception as exc:  # noqa: BLE001 - reported in the table, the other settings still run
                entry.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             traceback=traceback.format_exc())
                print(entry["traceback"], file=sys.stderr, flush=True)
            else:
                entry.update(status="ok", report=_report_json(report))
            entry["setting_wall_s"] = round(time.perf_counter() - t0, 2)
            entry["load_after"] = _load()
            results.append(entry)
            print(f"[benchmark_privacy]   {entry['status']} in {entry['setting_wall_s']}s", flush=True)
    return results


def _report_json(r: AttackReport) -> dict[str, Any]:
    d = asdict(r)
    s = d.pop("summary")
    d["num_clients"] = int(s["config"]["num_clients"])
    d["final"] = s["final"]
    d["wall_time_s"] = s.get("wall_time_s")
    d["rounds"] = s.get("rounds")
    d["missing_nodes"] = s.get("missing_nodes")
    return d


def _vectors_cell(n: int, total: int) -> str:
    return f"{n:,} ({100.0 * n / total:.2f}%)" if total else f"{n:,}"


def attack_table(results: list[dict[str, Any]]) -> tuple[str, list[str]]:
    cols = results
    head = ["attack"] + [f"{r['setting']}: protections **{r['mode']}**" for r in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    problems: list[str] = []
    ok = [r for r in cols if r["status"] == "ok"]
    keys = list(ATTACK_ROWS)
    for r in ok:
        keys += [k for k in r["report"]["recovered"] if k not in keys]

    def cell(r: dict[str, Any], fn) -> str:
        return "failed" if r["status"] != "ok" else fn(r["report"])

    for key in keys:
        label = ATTACK_ROWS.get(key, key)
        if key in SUBVECTOR_ROWS:
            label += " (share of N x M sub-vectors)"
        row = [label]
        for r in cols:
            def f(rep: dict[str, Any], key: str = key) -> str:
                if key not in rep["recovered"]:
                    return "not run"
                n = rep["recovered"][key]
                total = rep["num_vectors"] * (_m_of(r) if key in SUBVECTOR_ROWS else 1)
                text = _vectors_cell(n, total)
                nref = rep["refusals"].get(key, 0)
                if nref:
                    text += f"; refused by {nref}/{rep['num_clients']} nodes ({', '.join(rep['limits'].get(key, []))})"
                return text
            row.append(cell(r, f))
        lines.append("| " + " | ".join(row) + " |")
    # small cells
    lines.append("| small cells received (counts 1..4) | " + " | ".join(
        cell(r, lambda rep: f"{rep['small_cells']:,}") for r in cols) + " |")
    # stored codes recovered by search attacks
    search = [k for k in keys if k.startswith("search") or k == "exhaust_budget"]
    for key in search:
        if key == "exhaust_budget":
            continue
        lines.append(f"| stored PQ codes recovered: {ATTACK_ROWS.get(key, key)} | " + " | ".join(
            cell(r, lambda rep, key=key: _vectors_cell(rep["codes"][key], rep["num_vectors"]) if key in rep["codes"] else "not run")
            for r in cols) + " |")
    lines.append("| true 10-R@10 of the run | " + " | ".join(
        cell(r, lambda rep: _fmt(rep["final"]["federated"].get("recall_10_at_10"))) for r in cols) + " |")
    lines.append("| wall time: training run / whole setting (probes, scoring) | " + " | ".join(
        f"{_fmt(r.get('report', {}).get('wall_time_s'), 0)} s / {r['setting_wall_s']:.0f} s" for r in cols) + " |")
    for r in cols:
        if r["status"] != "ok":
            problems.append(f"attacks {r['setting']} {r['mode']}: run failed: {r['error']}")
        elif r["mode"] == "on":
            rep = r["report"]
            leaked = {k: v for k, v in rep["recovered"].items() if v}
            if leaked:
                problems.append(f"attacks {r['setting']} on: raw vectors recovered under the defaults: {leaked}")
            if rep["small_cells"]:
                problems.append(f"attacks {r['setting']} on: {rep['small_cells']} small cells left clients")
    return "\n".join(lines), problems


def _m_of(r: dict[str, Any]) -> int:
    for o in r["overrides"]:
        if o.startswith("index.m="):
            return int(o.split("=", 1)[1])
    return int(compose_config(r["overrides"])["index"]["m"])


# -- table 2: utility ----------------------------------------------------------------------


def run_utility(settings: dict[str, list[str]], data: list[str], runs: Path) -> list[dict[str, Any]]:
    results = []
    for i, (name, overrides) in enumerate(settings.items()):
        for j, (variant, extra) in enumerate(VARIANTS.items()):
            ov = [*data, *overrides, *extra]
            out_dir = runs / f"utility-{i}-{j}"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            entry: dict[str, Any] = {"setting": name, "variant": variant, "overrides": ov, "out_dir": str(out_dir),
                                     "started": _now(), "load_before": _load()}
            print(f"\n[benchmark_privacy] utility: {name}, {variant}  (load {entry['load_before']})", flush=True)
            print("[benchmark_privacy]   overrides:", " ".join(ov) or "(none)", flush=True)
            t0 = time.perf_counter()
            try:
                path = simulate(compose_config(ov), out_dir)
                summary = json.loads(path.read_text())
            except Exception as exc:  # noqa: BLE001
                entry.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             traceback=traceback.format_exc())
                print(entry["traceback"], file=sys.stderr, flush=True)
            else:
                entry.update(status="ok", final=summary["final"], wall_time_s=summary.get("wall_time_s"),
                             rounds=summary.get("rounds"), missing_nodes=summary.get("missing_nodes"))
            entry["job_wall_s"] = round(time.perf_counter() - t0, 2)
            entry["load_after"] = _load()
            results.append(entry)
            print(f"[benchmark_privacy]   {entry['status']} in {entry['job_wall_s']}s", flush=True)
    return results


def utility_table(results: list[dict[str, Any]], old: dict[str, float]) -> tuple[str, list[str]]:
    head = ["setting", "protocol", "true 10-R@10", "true 1-R@1", "distortion", "10-R@10 ratio vs off (target >= 0.99)",
            "private estimate 10-R@10 (error vs truth)", "bytes up / client / round", "wall time (s)", "vs old figure"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    problems: list[str] = []
    off = {r["setting"]: r for r in results if r["variant"].startswith("off") and r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['setting']} | {r['variant']} | failed: {r['error']} |" + " - |" * (len(head) - 3))
            problems.append(f"utility {r['setting']} {r['variant']}: run failed: {r['error']}")
            continue
        fed, est = r["final"]["federated"], r["final"].get("federated_estimate", {})
        recall = fed.get("recall_10_at_10")
        base = off.get(r["setting"])
        if r["variant"].startswith("off"):
            ratio = "1 (reference)"
        elif base and recall is not None and base["final"]["federated"].get("recall_10_at_10"):
            q = recall / base["final"]["federated"]["recall_10_at_10"]
            ratio = f"{q:.4f}" + ("" if q >= TARGET_RATIO else " **below target**")
            if q < TARGET_RATIO and old:  # not a check on the --quick smoke data (100 queries)
                problems.append(f"utility {r['setting']} {r['variant']}: 10-R@10 ratio vs off {q:.4f} < {TARGET_RATIO}")
        else:
            ratio = "-"
        err = est.get("error", {}).get("recall_10_at_10")
        estimate = f"{_fmt(est.get('recall_10_at_10'))} ({'-' if err is None else f'{err:+.4f}'})" if "recall_10_at_10" in est else "none"
        if r["variant"].startswith("off") and not str(fed.get("source", "")).startswith("simulator"):
            estimate += "; truth = the trusted evaluation (exact merged top-k)"
        vs_old = ""
        if r["variant"].startswith("off") and r["setting"] in old and recall is not None:
            d = recall - old[r["setting"]]
            verdict = "reproduced" if abs(d) <= REPRO_TOL else "**NOT reproduced**"
            vs_old = f"old {old[r['setting']]:.4f}, {verdict} ({d:+.4f})"
            if abs(d) > REPRO_TOL:
                problems.append(f"utility {r['setting']} off: 10-R@10 {recall:.4f} does not reproduce the old {old[r['setting']]:.4f}")
        elif recall is not None and r["setting"] in old:
            vs_old = f"{recall / old[r['setting']]:.4f} x old {old[r['setting']]:.4f}"
        lines.append("| " + " | ".join([
            r["setting"], r["variant"], _fmt(recall), _fmt(fed.get("recall_1_at_1")), _fmt(fed.get("distortion")), ratio,
            estimate, f"{r['final'].get('bytes_up_per_client_per_round', 0):,.0f}", _fmt(r.get("wall_time_s"), 0), vs_old,
        ]) + " |")
    return "\n".join(lines), problems


# -- tables 3-4: the cost of DP and of secure aggregation (--dp) ----------------------------

DP_EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0)
DEFAULT_EPSILON = 8.0  # conf/privacy/secure.yaml
DP_TARGET = 0.97  # true 10-R@10 at the default epsilon >= this x the no-DP run
SECAGG_TIME_TARGET = 1.5  # secure-aggregation round time <= this x plain ...
SECAGG_TIME_CLIENTS = 50  # ... at this many clients
NO_DP = ["privacy=secagg"]  # secure aggregation, no noise: the reference of every ratio
LAM0 = ["train.lam=0"]  # plain PQ, no encoder: no DP encoder either

DP_COMMON = ["eval.every=10", "save_shards=false", "eval.centralized=false"]  # truth at the end only
DP_SETTINGS = {  # name -> overrides (GloVe 100k, 2k queries, 10 rounds)
    "iid, 10 clients": ["partition=iid", "num_clients=10"],
    "iid, 50 clients": ["partition=iid", "num_clients=50"],
    "dirichlet, 10 clients": ["partition=dirichlet", "num_clients=10"],
    "dirichlet, 50 clients": ["partition=dirichlet", "num_clients=50"],
}
LAM0_SETTING = "iid, 10 clients"
TIMING_ARMS = {  # arm -> overrides
    "plain": ["privacy=trusted"],
    "secagg": ["privacy=secagg"],
}
TIMING_SETTINGS = {  # clients -> overrides (same for both arms)
    10: ["num_clients=10", "num_rounds=3"],
    50: ["num_clients=50", "num_rounds=3"],
    200: ["num_clients=200", "num_rounds=3", "data.num_base=20000"],
}

QUICK_DP_EPSILONS = (1.0, 8.0)
QUICK_DP_SETTINGS = {
    "iid, 10 clients": ["partition=iid", "num_clients=10", "num_rounds=2", "privacy.dp_max_releases=3"],
    "dirichlet, 10 clients": ["partition=dirichlet", "partition.num_clusters=20", "num_clients=10", "num_rounds=2",
                              "privacy.dp_max_releases=3"],
}
QUICK_TIMING_SETTINGS = {
    10: ["num_clients=10", "num_rounds=2"],
    20: ["num_clients=20", "num_rounds=2"],
}


def _reusable(out_dir: Path, overrides: list[str]) -> bool:
    """A finished run of exactly these overrides is in out_dir."""
    marker = out_dir / "benchmark_overrides.json"
    return (out_dir / "summary.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == overrides


def _run_entry(entry: dict[str, Any], out_dir: Path, reuse: bool) -> dict[str, Any]:
    """One plain simulation; fills entry (status, final, rounds, times). With ``reuse`` a
    finished run in out_dir with the same overrides is read back instead of run again."""
    ov = entry["overrides"]
    marker = out_dir / "benchmark_overrides.json"
    entry.update(out_dir=str(out_dir), load_before=_load())
    t0 = time.perf_counter()
    job_file = out_dir / "benchmark_job.json"  # when and how long the run took (read back with --reuse)
    if reuse and _reusable(out_dir, ov):
        summary = json.loads((out_dir / "summary.json").read_text())
        earlier = json.loads(job_file.read_text()) if job_file.is_file() else {}
        entry.update(status="ok", reused=True, started=earlier.get("started"),
                     first_job_wall_s=earlier.get("job_wall_s", summary.get("wall_time_s")),
                     load_before=earlier.get("load_before"))  # None: not recorded when it ran
        print(f"[benchmark_privacy]   reused {out_dir}", flush=True)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        marker.write_text(json.dumps(ov))
        entry["started"] = _now()
        try:
            summary = json.loads(simulate(compose_config(ov), out_dir).read_text())
        except Exception as exc:  # noqa: BLE001 - reported in the table, the other runs still go
            entry.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         traceback=traceback.format_exc())
            print(entry["traceback"], file=sys.stderr, flush=True)
            summary = None
        else:
            entry.update(status="ok", reused=False)
    if summary is not None:
        dp = summary["final"].get("privacy", {}).get("differential_privacy", {})
        entry.update(
            recall_10_at_10=summary["final"]["federated"].get("recall_10_at_10"),
            recall_1_at_1=summary["final"]["federated"].get("recall_1_at_1"),
            distortion=summary["final"]["federated"].get("distortion"),
            source=summary["final"]["federated"].get("source"),
            epsilon_spent=dp.get("epsilon"), dp_releases=len(dp.get("releases", [])) if dp.get("on") else 0,
            bytes_up_per_client_per_round=summary["final"].get("bytes_up_per_client_per_round"),
            round_s=round_seconds(summary.get("rounds") or []),
            wall_time_s=summary.get("wall_time_s"), rounds=summary.get("rounds"),
            missing_nodes=summary.get("missing_nodes"), final=summary["final"],
        )
    entry["job_wall_s"] = round(time.perf_counter() - t0, 2)
    entry["load_after"] = _load()
    if entry["status"] == "ok" and not entry.get("reused"):
        job_file.write_text(json.dumps({k: entry[k] for k in ("started", "job_wall_s", "load_before", "load_after")}))
    print(f"[benchmark_privacy]   {entry['status']} in {entry['job_wall_s']}s"
          + (f", 10-R@10 {entry['recall_10_at_10']:.4f}" if entry.get("recall_10_at_10") is not None else ""), flush=True)
    return entry


def round_seconds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per training round: differences of ``elapsed_s`` between consecutive rows
    (round r's row is written after its training and evaluation); their median."""
    rows = sorted((r for r in rounds if "round" in r and "elapsed_s" in r), key=lambda r: r["round"])
    diffs = [round(b["elapsed_s"] - a["elapsed_s"], 2) for a, b in zip(rows, rows[1:]) if b["round"] >= 1]
    return {"per_round": diffs, "median": statistics.median(diffs) if diffs else None}


def dp_jobs(settings: dict[str, list[str]], epsilons: tuple[float, ...], data: list[str]) -> list[dict[str, Any]]:
    """Every run of table 3, in the order that keeps a run cut short by --max-minutes
    useful: the first (default) setting's no-DP run and default epsilon (the target),
    its train.lam=0 pair, the rest of its curve (extremes first); then every other
    setting's no-DP run and default epsilon; then the rest of their curves."""
    def job(i: int, name: str, overrides: list[str], eps: float | None, lam0: bool) -> dict[str, Any]:
        arm = NO_DP if eps is None else ["privacy=secure", f"privacy.dp_epsilon={eps:g}"]
        tag = f"dp-{i}-{'nodp' if eps is None else f'eps{eps:g}'}{'-lam0' if lam0 else ''}"
        return {"section": "dp", "setting": name, "epsilon": eps, "lam0": lam0, "tag": tag,
                "overrides": [*data, *DP_COMMON, *overrides, *arm, *(LAM0 if lam0 else [])]}

    items = list(settings.items())
    first = [DEFAULT_EPSILON] if DEFAULT_EPSILON in epsilons else []
    rest = [e for e in epsilons if e not in first]
    rest = sorted(rest, key=lambda e: (e not in (min(rest), max(rest)), e)) if rest else rest  # 1, 16, 2, 4
    jobs = [job(0, items[0][0], items[0][1], eps, False) for eps in (None, *first)]
    jobs += [job(i, name, ov, eps, True) for i, (name, ov) in enumerate(items) if name == LAM0_SETTING for eps in (None, DEFAULT_EPSILON)]
    jobs += [job(0, items[0][0], items[0][1], eps, False) for eps in rest]
    jobs += [job(i, name, ov, eps, False) for i, (name, ov) in enumerate(items) if i > 0 for eps in (None, *first)]
    jobs += [job(i, name, ov, eps, False) for i, (name, ov) in enumerate(items) if i > 0 for eps in rest]
    return jobs


def timing_jobs(settings: dict[int, list[str]], data: list[str]) -> list[dict[str, Any]]:
    """Table 4: per client count, the plain and secagg arms back to back."""
    jobs = []
    for clients, overrides in settings.items():
        for arm, extra in TIMING_ARMS.items():
            jobs.append({"section": "timing", "clients": clients, "arm": arm, "tag": f"timing-{clients}-{arm}",
                         "overrides": [*data, "eval.every=10", "save_shards=false", "eval.centralized=false", *overrides, *extra]})
    return jobs


def _label(e: dict[str, Any]) -> str:
    if e["section"] == "timing":
        return f"timing: {e['clients']} clients, {e['arm']}"
    return f"dp: {e['setting']}{', lam=0' if e['lam0'] else ''}, " + ("no DP" if e["epsilon"] is None else f"eps={e['epsilon']:g}")


def dp_reference(results: list[dict[str, Any]], e: dict[str, Any]) -> dict[str, Any] | None:
    """The no-DP run of e's setting (same train.lam)."""
    for r in results:
        if r["section"] == "dp" and r["setting"] == e["setting"] and r["lam0"] == e["lam0"] and r["epsilon"] is None:
            return r
    return None


def dp_ratio(results: list[dict[str, Any]], e: dict[str, Any]) -> float | None:
    ref = dp_reference(results, e)
    if ref is None or e.get("recall_10_at_10") is None or not ref.get("recall_10_at_10"):
        return None
    return e["recall_10_at_10"] / ref["recall_10_at_10"]


def dp_tables(results: list[dict[str, Any]], epsilons: tuple[float, ...]) -> tuple[str, str, str, list[str], list[str]]:
    """(recall table, epsilon-spent table, lam=0 table, target lines, problems)."""
    dp = [r for r in results if r["section"] == "dp"]
    rows = [(s, lam0) for s in dict.fromkeys(r["setting"] for r in dp) for lam0 in (False, True)
            if any(r["setting"] == s and r["lam0"] == lam0 for r in dp)]

    def find(s: str, lam0: bool, eps: float | None) -> dict[str, Any] | None:
        return next((r for r in dp if r["setting"] == s and r["lam0"] == lam0 and r["epsilon"] == eps), None)

    head = ["setting", "no DP (privacy=secagg)", *(f"eps={e:g}" + (" (default)" if e == DEFAULT_EPSILON else "") for e in epsilons)]
    t_recall = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t_eps = ["| " + " | ".join(["setting", *(f"eps={e:g}" for e in epsilons)]) + " |", "|" + "---|" * (len(epsilons) + 1)]
    problems, targets = [], []
    for s, lam0 in rows:
        name = s + (", train.lam=0" if lam0 else "")
        cells, eps_cells = [], []
        for eps in (None, *epsilons):
            r = find(s, lam0, eps)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append("failed")
                problems.append(f"{_label(r)}: run failed: {r.get('error')}")
            elif eps is None:
                cells.append(f"{_fmt(r['recall_10_at_10'])} (1)")
            else:
                q = dp_ratio(results, r)
                cells.append(f"{_fmt(r['recall_10_at_10'])} ({_fmt(q, 3)}x)")
            if eps is not None:
                eps_cells.append("-" if r is None or r["status"] != "ok" else
                                 f"{_fmt(r.get('epsilon_spent'), 3)} ({r.get('dp_releases', 0)} releases)")
        t_recall.append("| " + " | ".join([name, *cells]) + " |")
        t_eps.append("| " + " | ".join([name, *eps_cells]) + " |")
        r8 = find(s, lam0, DEFAULT_EPSILON)
        if r8 is not None and r8["status"] == "ok" and not lam0:
            q = dp_ratio(results, r8)
            ok = q is not None and q >= DP_TARGET
            targets.append(f"{'PASS' if ok else 'FAIL'}: {s}{' (the default setting)' if s == LAM0_SETTING else ''}: true 10-R@10 at eps={DEFAULT_EPSILON:g} is "
                           f"{_fmt(q, 3)}x the no-DP run (target >= {DP_TARGET})")
        for eps in epsilons:
            r = find(s, lam0, eps)
            if r is not None and r["status"] == "ok" and r.get("epsilon_spent") is not None and r["epsilon_spent"] > eps * 1.0001:
                problems.append(f"{_label(r)}: epsilon spent {r['epsilon_spent']} exceeds the budget {eps:g}")
    # the noise vs the DP encoder (train.lam=0: no encoder, so no DP encoder)
    cells = {(lam0, eps): find(LAM0_SETTING, lam0, eps) for lam0 in (False, True) for eps in (None, DEFAULT_EPSILON)}
    t_lam0 = "(not run)"
    if all(r is not None and r["status"] == "ok" for r in cells.values()):
        R = {k: r["recall_10_at_10"] for k, r in cells.items()}
        t_lam0 = "\n".join([
            "| " + " | ".join(["encoder", "no DP (privacy=secagg)", f"eps={DEFAULT_EPSILON:g} (privacy=secure)", "DP / no DP"]) + " |",
            "|---|---|---|---|",
            f"| train.lam=10 (default): torch rotation encoder without DP, over-relaxed federated Procrustes (train.procrustes_step=4) under DP | {_fmt(R[(False, None)])} | "
            f"{_fmt(R[(False, DEFAULT_EPSILON)])} | {_fmt(R[(False, DEFAULT_EPSILON)] / R[(False, None)], 3)}x |",
            f"| train.lam=0: no encoder (plain PQ on the raw vectors), the same in both arms | {_fmt(R[(True, None)])} | "
            f"{_fmt(R[(True, DEFAULT_EPSILON)])} | {_fmt(R[(True, DEFAULT_EPSILON)] / R[(True, None)], 3)}x |",
            f"| lam=10 / lam=0 | {_fmt(R[(False, None)] / R[(True, None)], 3)}x | {_fmt(R[(False, DEFAULT_EPSILON)] / R[(True, DEFAULT_EPSILON)], 3)}x | |",
        ])
    return "\n".join(t_recall), "\n".join(t_eps), t_lam0, targets, problems


def timing_table(results: list[dict[str, Any]], target_clients: int | None) -> tuple[str, list[str], list[str]]:
    tm = [r for r in results if r["section"] == "timing"]
    head = ["clients", "base / rounds", "plain s/round (median)", "secagg s/round (median)", "secagg / plain time",
            "fastest round: plain / secagg s (ratio)",
            "plain bytes up / client / round", "secagg bytes up / client / round", "secagg / plain bytes",
            "run wall s plain / secagg", "each round's s: plain / secagg", "load (1-min) at start: plain / secagg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets, problems = [], []
    for clients in dict.fromkeys(r["clients"] for r in tm):
        arms = {r["arm"]: r for r in tm if r["clients"] == clients}
        p, s = arms.get("plain"), arms.get("secagg")
        bad = [r for r in (p, s) if r is None or r["status"] != "ok"]
        for r in bad:
            if r is not None:
                problems.append(f"{_label(r)}: run failed: {r.get('error')}")
        if bad:
            lines.append(f"| {clients} | " + " | ".join(["failed / not run"] * (len(head) - 1)) + " |")
            continue
        ov = compose_config(p["overrides"])
        tp, ts = p["round_s"]["median"], s["round_s"]["median"]
        bp, bs = p["bytes_up_per_client_per_round"], s["bytes_up_per_client_per_round"]
        q = ts / tp if tp and ts is not None else None
        lines.append("| " + " | ".join([
            str(clients), f"{int(ov['data']['num_base']):,} / {ov['num_rounds']}", _fmt(tp, 2), _fmt(ts, 2), _fmt(q, 2) + "x",
            f"{min(p['round_s']['per_round']):g} / {min(s['round_s']['per_round']):g} "
            f"({min(s['round_s']['per_round']) / min(p['round_s']['per_round']):.2f}x)",
            f"{bp:,.0f}", f"{bs:,.0f}", _fmt(bs / bp if bp else None, 2) + "x",
            f"{_fmt(p.get('wall_time_s'), 0)} / {_fmt(s.get('wall_time_s'), 0)}",
            f"{', '.join(f'{x:g}' for x in p['round_s']['per_round'])} / {', '.join(f'{x:g}' for x in s['round_s']['per_round'])}",
            " / ".join(str(r.get("load_before") or "?").split()[0] for r in (p, s)),
        ]) + " |")
        if clients == target_clients:
            ok = q is not None and q <= SECAGG_TIME_TARGET
            targets.append(f"{'PASS' if ok else 'FAIL'}: secure aggregation round time at {clients} clients is "
                           f"{_fmt(q, 2)}x plain (target <= {SECAGG_TIME_TARGET})")
    return ("\n".join(lines) if tm else "(not run)"), targets, problems


def write_dp_outputs(out: Path, results: list[dict[str, Any]], meta: dict[str, Any], epsilons: tuple[float, ...],
                     quick: bool, final: bool) -> tuple[list[str], list[str]]:
    """benchmark_dp.md/.json (and, when final, the plot); (target lines, problems)."""
    t_recall, t_eps, t_lam0, targets3, p3 = dp_tables(results, epsilons)
    t4, targets4, p4 = timing_table(results, None if quick else SECAGG_TIME_CLIENTS)
    targets, problems = targets3 + targets4, p3 + p4
    if quick:
        targets = [t.replace("PASS", "(not checked, --quick) pass").replace("FAIL", "(not checked, --quick) fail") for t in targets]
    missed = [t for t in targets if t.startswith("FAIL")]
    n_reused = sum(bool(r.get("reused")) for r in results)
    plot = out / "privacy_utility.png"
    data3 = ("synthetic (tests/privacy-like), 2 rounds, dp_max_releases=3" if quick else
             "GloVe-50d 100k base / 2k queries, PQ 10x8, 10 rounds, rotation encoder lam=10, "
             f"delta=1e-6, dp_max_releases=11; {' '.join(DP_COMMON)}")
    md = "\n".join([
        "# Cost of secure aggregation and differential privacy" + (" (--quick smoke test)" if quick else ""),
        "",
        f"`{meta['command']}`, started {meta['started']}, {meta.get('wall_time_s', 0):.0f} s in all"
        + ("" if final else " so far (**incomplete**: runs still going)")
        + (f" ({n_reused} of {len(results)} runs read back with --reuse; the runs took "
           f"{sum(r.get('first_job_wall_s') or r.get('job_wall_s') or 0 for r in results):.0f} s when they ran)" if n_reused else "")
        + f", load average {meta['load_start']} at the start and {_load()} at the end ({os.cpu_count()} cores, shared with other jobs).",
        "",
        "## 3. Privacy / utility",
        "",
        f"Data: {data3}. **no DP** = `privacy=secagg` (secure aggregation, exact sums); **eps=E** = "
        "`privacy=secure privacy.dp_epsilon=E` (secure aggregation + central DP, the default at E=8). "
        "Cells: true 10-R@10 (the simulator's, global model over the union of shards) and, in brackets, "
        "its ratio to the no-DP run of the same setting.",
        "",
        t_recall,
        "",
        "Epsilon actually spent, as the accountant reports it (`final.privacy.differential_privacy.epsilon`, "
        "dp-accounting RDP over the noisy sums that happened), against the budget the clients calibrated to:",
        "",
        t_eps,
        "",
        f"### The noise vs the DP encoder ({LAM0_SETTING}, eps={DEFAULT_EPSILON:g})",
        "",
        "Under DP the rotation encoder is learned by over-relaxed federated Procrustes (train.procrustes_step, default 4) on clipped noisy sums; without DP "
        "by the torch encoder (local SGD, FedAvg). With `train.lam=0` neither arm has an encoder, so the "
        "DP / no-DP ratio of that row is the cost of the noise alone (on the codebook statistics).",
        "",
        t_lam0,
        "",
        f"![privacy/utility]({plot.name})",
        "",
        "## 4. Cost of secure aggregation",
        "",
        "**plain** = `privacy=trusted` (each client's statistics sent unmasked); **secagg** = `privacy=secagg` "
        "(the same statistics inside a secure sum: key setup, Shamir shares, masked fixed-point vector, unmask), no DP in either arm; "
        f"{'synthetic' if quick else 'GloVe'}, IID, eval every round (private estimate) with the truth at the last. Seconds per round: "
        "differences of `rounds[].elapsed_s` (training + the round's evaluation; the last also holds the "
        "simulator's truth), median over the rounds; the fastest round of each arm is beside it (the least disturbed by other jobs on the machine). Bytes up: what a client sends for one training round "
        "(secagg: all four stages of the train sum), averaged over rounds (`final.bytes_up_per_client_per_round`). "
        "The two arms of a row run back to back.",
        "",
        t4,
        "",
        "## Targets",
        "",
        *[f"- {t}" for t in targets],
        "",
        *(["## Problems", "", *[f"- {p}" for p in problems], ""] if problems else []),
        *(["## Not run (--max-minutes)", "", "The same command with `--reuse` (and without `--max-minutes`) reads the "
           "finished runs back from the runs directory and runs these:", "", *[f"- {x}" for x in meta["not_run"]], ""]
          if meta.get("not_run") else []),
    ])
    (out / "benchmark_dp.md").write_text(md)
    (out / "benchmark_dp.json").write_text(json.dumps({
        **meta, "complete": final, "epsilons": list(epsilons), "default_epsilon": DEFAULT_EPSILON,
        "dp_target": DP_TARGET, "secagg_time_target": SECAGG_TIME_TARGET, "secagg_time_clients": SECAGG_TIME_CLIENTS,
        "targets": targets, "missed": missed, "problems": problems, "plot": str(plot),
        "curve": [{"setting": r["setting"] + (", train.lam=0" if r["lam0"] else ""), "epsilon": r["epsilon"],
                   "recall_10_at_10": r.get("recall_10_at_10"), "ratio": dp_ratio(results, r),
                   "epsilon_spent": r.get("epsilon_spent")} for r in results if r["section"] == "dp" and r["status"] == "ok"],
        "runs": results,
    }, indent=2, default=str, allow_nan=True))
    if final:
        from simulations.report import plot_privacy_utility
        try:
            plot_privacy_utility(out / "benchmark_dp.json", plot)
        except Exception:  # noqa: BLE001 - the tables are written; say why the plot is not
            problems.append(f"plot failed: {traceback.format_exc().splitlines()[-1]}")
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        print("\n" + md, flush=True)
    return targets, problems


def run_dp(out: Path, runs: Path, quick: bool, reuse: bool, epsilons: tuple[float, ...] | None, meta: dict[str, Any],
           sections: tuple[str, ...] = ("curve", "timing"), max_minutes: float | None = None) -> tuple[list[str], list[str]]:
    data = QUICK_DATA if quick else []
    eps = epsilons or (QUICK_DP_EPSILONS if quick else DP_EPSILONS)
    jobs = []
    if "timing" in sections:  # short: first, so the secagg figures are there early
        jobs += timing_jobs(QUICK_TIMING_SETTINGS if quick else TIMING_SETTINGS, data)
    if "curve" in sections:
        jobs += dp_jobs(QUICK_DP_SETTINGS if quick else DP_SETTINGS, eps, data)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    not_run, spent = [], 0.0  # spent: seconds of runs this invocation ran (not read back)
    for n, job in enumerate(jobs, 1):
        over = max_minutes is not None and spent >= 60 * max_minutes
        if over and not (reuse and _reusable(runs / job["tag"], job["overrides"])):  # finished runs are still read back
            not_run.append(_label(job))
            print(f"[benchmark_privacy] --max-minutes {max_minutes:g} reached: not running {_label(job)}", flush=True)
            meta["not_run"] = not_run
            continue
        print(f"\n[benchmark_privacy] {n}/{len(jobs)} {_label(job)}  (load {_load()}, {time.perf_counter() - t0:.0f} s so far)", flush=True)
        print("[benchmark_privacy]   overrides:", " ".join(job["overrides"]), flush=True)
        results.append(_run_entry(job, runs / job.pop("tag"), reuse))
        meta["wall_time_s"] = round(time.perf_counter() - t0, 1)
        if not results[-1].get("reused"):
            spent += results[-1]["job_wall_s"]
            write_dp_outputs(out, results, meta, eps, quick, final=False)  # partial tables while the rest run
    meta["wall_time_s"] = round(time.perf_counter() - t0, 1)
    meta["load_end"] = _load()
    return write_dp_outputs(out, results, meta, eps, quick, final=True)


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data: a smoke test in a few minutes")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the .md and .json go (default docs/results/privacy; with --quick outputs/benchmark_privacy_quick)")
    ap.add_argument("--runs", type=Path, default=None, help="run directories (default <out>/runs)")
    ap.add_argument("--skip-attacks", action="store_true", help="table 2 only")
    ap.add_argument("--skip-utility", action="store_true", help="table 1 only")
    ap.add_argument("--dp", action="store_true",
                    help="tables 3-4 only (privacy/utility curve, secure-aggregation cost): benchmark_dp.md/.json + privacy_utility.png")
    ap.add_argument("--all", action="store_true", help="tables 1-4: --dp first, then the default invocation (tables 1-2)")
    ap.add_argument("--dp-sections", default="curve,timing", help="with --dp: curve, timing or both (default)")
    ap.add_argument("--epsilons", default=None, help="with --dp: comma-separated DP budgets (default 1,2,4,8,16)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="with --dp: start no new run once the runs of this invocation took this many minutes "
                         "(runs read back with --reuse do not count; 0: run nothing; the tables say what was not run)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --dp: read back finished runs under --runs (same overrides) instead of running them again")
    args = ap.parse_args(argv)
    out: Path = args.out or Path("outputs/benchmark_privacy_quick" if args.quick else "docs/results/privacy")
    runs: Path = args.runs or out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "-m", "simulations.benchmark_privacy", *(argv if argv is not None else sys.argv[1:])])
    dp_status = 0
    if args.dp or args.all:
        meta = {"command": command, "quick": args.quick, "started": _now(), "load_start": _load(), "cpus": os.cpu_count(),
                "runs_dir": str(runs)}
        epsilons = tuple(float(e) for e in args.epsilons.split(",")) if args.epsilons else None
        sections = tuple(x.strip() for x in args.dp_sections.split(",") if x.strip())
        targets, dp_problems = run_dp(out, runs, args.quick, args.reuse, epsilons, meta, sections, args.max_minutes)
        print("\ntargets:\n" + "\n".join(f"  {t}" for t in targets), flush=True)
        if dp_problems:
            print("problems:\n" + "\n".join(f"  {p}" for p in dp_problems), flush=True)
        print(f"\nwritten: {out / 'benchmark_dp.md'}  {out / 'benchmark_dp.json'}  {out / 'privacy_utility.png'}", flush=True)
        dp_status = 1 if dp_problems or any(t.startswith("FAIL") for t in targets) else 0
        if not args.all:
            return dp_status
    attack_settings, attack_data = (QUICK_ATTACK_SETTINGS, QUICK_DATA) if args.quick else (ATTACK_SETTINGS, ATTACK_DATA)
    utility_settings, utility_data = (QUICK_UTILITY_SETTINGS, QUICK_DATA) if args.quick else (UTILITY_SETTINGS, [])
    old = {} if args.quick else OLD_FIGURES

    started, t0, load0 = _now(), time.perf_counter(), _load()
    attacks = [] if args.skip_attacks else run_attacks(attack_settings, attack_data, runs)
    utility = [] if args.skip_utility else run_utility(utility_settings, utility_data, runs)
    wall = round(time.perf_counter() - t0, 1)

    t1, p1 = attack_table(attacks) if attacks else ("(not run)", [])
    t2, p2 = utility_table(utility, old) if utility else ("(not run)", [])
    problems = p1 + p2
    data1 = "synthetic (tests/privacy-like)" if args.quick else "GloVe-50d 20k base / 200 queries, PQ 10x8, eval.centralized=false"
    data2 = "synthetic (tests/privacy-like), 2 rounds" if args.quick else "GloVe-50d 100k base / 2k queries, PQ 10x8, 10 rounds, rotation encoder lam=10"
    md = "\n".join([
        "# Privacy benchmark" + (" (--quick smoke test)" if args.quick else ""),
        "",
        f"`python -m simulations.benchmark_privacy{' --quick' if args.quick else ''}`, started {started}, "
        f"{wall:.0f} s in all, load average {load0} at the start and {_load()} at the end ({os.cpu_count()} cores).",
        "",
        "## 1. Attacks by setting",
        "",
        f"Data: {data1}. The server is the attack suite's attacker (`simulations/attack_suite.py`): it records "
        "every message and, in the settings with active probes, then sends its own requests. "
        "Protections **on** = the defaults; in setting (a) the server also rewrote every training-time "
        f"config to `eval.k={TRAINING_REWRITE_K}` and `eval.protocol=trusted`. Protections **off** = "
        "`eval.protocol=trusted privacy=off` (the protocol before the protections). Cells: raw vectors "
        "recovered exactly (within 0.1% of their norm) and their share of the base; nodes that refused an "
        "attack, with the limit they named. Stored PQ codes are what a search answer (distances on codes) "
        "can give away at most.",
        "",
        t1,
        "",
        "## 2. Utility",
        "",
        f"Data: {data2}; plain runs, no attacker. **on** = all defaults; **off** = `eval.protocol=trusted "
        "privacy=off`; **public** = defaults + `init.source=public` (codebooks start from k-means on the "
        "held-out public queries, no client statistics at init). True figures are the simulator's (the "
        "global model over the union of shards); for the off runs the federation's trusted evaluation "
        "(exact merged top-k) is the truth. The private estimate is the federation's own (each shard's "
        "recall on a held-out sample of its own vectors, averaged); error = estimate - truth. "
        f"Old figures: the protocol before the protections, 10-R@10 (issue 9); 'reproduced' = within {REPRO_TOL}.",
        "",
        t2,
        "",
        "## Checks",
        "",
        *([("all passed: no raw vector or small cell under the defaults"
            + (" (on/off ratio and old figures are not checked on the --quick smoke data)" if args.quick
               else ", on/off ratio >= 0.99, old figures reproduced"))]
          if not problems else [f"- {p}" for p in problems]),
        "",
    ])
    print("\n" + md, flush=True)
    name = "benchmark_privacy"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps({
        "command": command,
        "quick": args.quick, "started": started, "wall_time_s": wall, "load_start": load0, "load_end": _load(),
        "cpus": os.cpu_count(), "runs_dir": str(runs), "old_figures": old, "target_ratio": TARGET_RATIO,
        "attacks": attacks, "utility": utility, "problems": problems,
    }, indent=2, default=str, allow_nan=True))
    print(f"\nwritten: {out / f'{name}.md'}  {out / f'{name}.json'}", flush=True)
    return 1 if problems or dp_status else 0


if __name__ == "__main__":
    sys.exit(main())
