"""Scale: seconds per round and per client message, peak memory, bytes and recall as the
number of clients grows; the whole job against centralized OPQ training; search ratios.

    python -m simulations.benchmark_scale                       # clients 10,100,1000, 3 rounds each
    python -m simulations.benchmark_scale --clients 10,100 --rounds 2 --skip-search

From one run, side by side:

1. Flower's own floor: an echo ClientApp in Flower's simulation engine, one message to
   every node, median of 3 (no fedvec code in the loop).
2. fedvec runs (``python -m simulations.run``, GloVe 100k, the default experiment, with
   ``eval.centralized=false save_shards=false`` and the given ``--overrides``): seconds
   per training round (round 0, the init, reported apart), seconds per client message,
   peak RSS and PSS sums of the whole process tree (driver, Ray and its workers, sampled
   every 0.25 s),
   bytes up per client per round, the true 10-R@10 after init and at the end.
3. The whole default job (``summary.json`` ``wall_time_s``, set-up excluded) against
   faiss ``OPQ10_50,PQ10x8np`` trained centrally on the same 100k vectors, 2 threads.
4. Federated search at batch 1 and 1000 against one faiss index
   (``simulations.benchmark_search``).

Figures go to stdout and ``docs/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simulations.process_tree import descendants

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "results" / "scale.md"


# -- memory of a process tree -------------------------------------------------------------


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of ``pid`` and all its descendants (Ray's daemons and workers
    included). The RSS sum counts a page shared by several processes (torch's and faiss's
    libraries, mapped by the driver and every worker) once per process; PSS splits it
    among them, so the PSS sum is the memory the tree really holds."""
    rss, pss = 0, 0
    for p in [pid, *(child for child, _ in descendants(pid))]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, tuple[int, int], float]:
    """(return code, peak tree (RSS, PSS) bytes, wall seconds) of a command."""
    peak, t = (0, 0), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak = (max(peak[0], rss), max(peak[1], pss))
            time.sleep(0.25)
    return proc.returncode, peak, time.perf_counter() - t


# -- 1. Flower's floor ----------------------------------------------------------------------


def flower_floor(num_nodes: int, pump: str, reps: int = 3) -> float:
    """Median seconds for one send_and_receive of an empty message to every node, with
    Flower's own message pump (``pump="flower"``) or fedvec's (``simulations.flower_engine``)."""
    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from omegaconf import OmegaConf

    from fed_app.config import CONF_DIR
    from fed_app.federation import wait_for_nodes
    from simulations import flower_engine

    if pump == "flower":
        flower_engine.uninstall()
    else:
        flower_engine.install(float(OmegaConf.load(CONF_DIR / "config.yaml").engine_poll_s))

    client, server, times = ClientApp(), ServerApp(), []

    @client.query()
    def echo(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict(), reply_to=msg)

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, num_nodes, 300)
        for _ in range(reps + 1):  # the first one starts the workers
            t = time.perf_counter()
            replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes], timeout=600)
            times.append(time.perf_counter() - t)
            assert len(replies) == len(nodes)

    run_simulation(server_app=server, client_app=client, num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": True}})
    return statistics.median(times[1:])


# -- 2. fedvec runs -------------------------------------------------------------------------


def fedvec_run(clients: int, rounds: int, overrides: list[str], workdir: Path) -> dict:
    out = workdir / f"clients-{clients}"
    cmd = [sys.executable, "-m", "simulations.run", f"num_clients={clients}", f"num_rounds={rounds}",
           "eval.centralized=false", "save_shards=false", *overrides, f"hydra.run.dir={out}"]
    rc, peak, wall = run_measured(cmd, {**os.environ, "PYTHONPATH": str(REPO)}, workdir / f"clients-{clients}.log")
    if rc != 0:
        return {"clients": clients, "failed": f"exit {rc}, see {workdir / f'clients-{clients}.log'}"}
    s = json.loads((out / "summary.json").read_text())
    elapsed = [r["elapsed_s"] for r in s["rounds"]]
    per_round = float(np.mean(np.diff(elapsed))) if len(elapsed) > 1 else float("nan")
    every = s["config"]["eval"]["every"]
    evaluated = sum(1 for r in range(1, rounds + 1) if r % every == 0 or r == rounds)  # rounds with evaluate messages
    trained = float(np.mean([r.get("clients", clients) for r in s["rounds"][1:]])) if len(s["rounds"]) > 1 else clients
    return {
        "clients": clients, "init_s": elapsed[0], "round_s": per_round, "sampled": trained,
        "message_s": per_round / (trained + clients * evaluated / rounds), "peak_rss_gb": peak[0] / 2**30, "peak_pss_gb": peak[1] / 2**30,
        "bytes_up": s["final"]["bytes_up_per_client_per_round"], "init_recall": s["rounds"][0].get("recall_10_at_10"),
        "final_recall": s["final"]["federated"]["recall_10_at_10"], "wall_s": s["wall_time_s"], "process_s": wall,
    }


# -- 3. whole job vs OPQ training -----------------------------------------------------------


def opq_train_seconds(threads: int = 2) -> float:
    import faiss

    from vector_index.datasets import load_glove

    from omegaconf import OmegaConf

    from fed_app.config import CONF_DIR

    c = OmegaConf.load(CONF_DIR / "data" / "glove.yaml")  # the default job's data
    data = load_glove(num_base=int(c.num_base), num_queries=int(c.num_queries), normalise=bool(c.normalise),
                      seed=int(OmegaConf.load(CONF_DIR / "config.yaml").seed))
    faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(data.base.shape[1], "OPQ10_50,PQ10x8np")
    t = time.perf_counter()
    index.train(data.base)
    return time.perf_counter() - t


def whole_job(workdir: Path, overrides: list[str]) -> dict:
    out = workdir / "default-job"
    cmd = [sys.executable, "-m", "simulations.run", *overrides, f"hydra.run.dir={out}"]
    rc, _, _ = run_measured(cmd, {**os.environ, "PYTHONPATH": str(REPO)}, workdir / "default-job.log")
    if rc != 0:
        raise SystemExit(f"the default job failed (exit {rc}); see {workdir / 'default-job.log'}")
    s = json.loads((out / "summary.json").read_text())
    opq = opq_train_seconds()
    return {"job_s": s["wall_time_s"], "opq_s": opq, "ratio": s["wall_time_s"] / opq,
            "centralized_source": s["final"].get("centralized", {}).get("source", "off")}


# -- report ---------------------------------------------------------------------------------


def report(floor: dict[int, dict[str, float]], runs: list[dict], job: dict | None, search: list[dict] | None, args) -> str:
    lines = [f"# Scale benchmark\n\n`python -m simulations.benchmark_scale {' '.join(sys.argv[1:])}` on "
             f"{os.cpu_count()} cores, load before {args.load_before}, after {os.getloadavg()[0]:.2f}.\n",
             "## Flower's floor: one empty message to every node (echo ClientApp), median of 3\n",
             "| nodes | s per send_and_receive | ms per message |", "|---|---|---|"]
    lines[-2:] = ["| nodes | Flower's pump: s per send_and_receive | ms per message | fedvec's pump (flower_engine) | ms per message | speed-up |",
                  "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {t['flower']:.2f} | {1e3 * t['flower'] / n:.1f} | {t['fedvec']:.2f} | {1e3 * t['fedvec'] / n:.1f} "
              f"| {t['flower'] / t['fedvec']:.1f}x |" for n, t in floor.items()]
    lines += ["", f"## fedvec, {args.rounds} rounds, overrides `{' '.join(args.overrides) or '(none)'}`\n",
              "| clients | trained per round | init s | s per round | ms per client message | peak RSS sum (GB) | peak PSS sum (GB) "
              "| bytes up per client per round | true 10-R@10 after init | final |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "failed" in r:
            lines.append(f"| {r['clients']} | failed: {r['failed']} |||||||||")
            continue
        init = "-" if r["init_recall"] is None else f"{r['init_recall']:.4f}"
        lines.append(f"| {r['clients']} | {r['sampled']:.0f} | {r['init_s']:.1f} | {r['round_s']:.1f} | {1e3 * r['message_s']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['peak_pss_gb']:.2f} | {r['bytes_up']:.0f} | {init} | {r['final_recall']:.4f} |")
    if job:
        lines += ["", "## Whole default job vs centralized OPQ training (same data, same run)\n",
                  f"default job {job['job_s']:.1f} s (summary wall_time_s; centralized reference: {job['centralized_source']}), "
                  f"faiss OPQ10_50,PQ10x8np training on 2 threads {job['opq_s']:.1f} s: **{job['ratio']:.2f}x**"]
    if search:
        lines += ["", "## Federated search vs one faiss index (10 shards, Flower simulation engine)\n"]
        lines += [f"- batch {r['batch']}: federated {1e3 * r['fed_s']:.1f} ms, single {1e3 * r['single_s']:.3f} ms, "
                  f"**{r['fed_s'] / r['single_s']:.1f}x**" for r in search]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--overrides", nargs="*", default=[], help="extra simulations.run overrides for the scale runs")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    args = ap.parse_args(argv)
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    clients = [int(c) for c in args.clients.split(",")]
    floor = {}
    for n in [] if args.skip_floor else clients:
        floor[n] = {p: flower_floor(n, p) for p in ("flower", "fedvec")}
        print(f"[benchmark_scale] floor {n} nodes: {floor[n]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedvec-scale-") as tmp:
        runs = []
        for n in clients:
            runs.append(fedvec_run(n, args.rounds, args.overrides, Path(tmp)))
            print(f"[benchmark_scale] {runs[-1]}", flush=True)
        job = None if args.skip_job else whole_job(Path(tmp), [])
        print(f"[benchmark_scale] whole job {job}", flush=True)
    search = None
    if not args.skip_search:
        from simulations.benchmark_search import main as search_main

        search = [r for r in search_main(["--reps", "5"]) if r["batch"] in (1, 1000)]
    text = report(floor, runs, job, search, args)
    print(text)
    OUT.write_text(text)


if __name__ == "__main__":
    main()
