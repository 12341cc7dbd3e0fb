"""Federated search through real Flower vs one faiss index: latency, QPS, bytes per query.

    python -m simulations.benchmark_search                 # GloVe 100k, 10 shards, PQ 10x8
    python -m simulations.benchmark_search --num-base 20000 --reps 3

Set-up: GloVe-6B-50d (100k base vectors, 2000 held-out queries), an iid partition into
10 shards, PQ 10x8 codebooks trained once centrally by faiss on the pooled base, and
every shard a ``vector_index.store.Shard`` in a temporary directory encoded with them
(``<root>/client-<partition-id>``). The reference is one faiss index over the union
built from the same codebooks, searched in the same process.

The federated side runs in Flower's simulation engine (``run_simulation``): a small
ServerApp defined here calls ``fed_app.federated_search.search_federation`` (the same
call search mode makes) for batches of 1, 100 and 1000 queries, median of ``--reps``
repetitions after one warm-up. The ClientApp is the real ``fed_app.client_app.app``: in
simulation it finds its shard through ``deploy.shard-root`` in the message config plus
its ``partition-id`` (a deployed SuperNode would use ``shard-dir``). It keeps its shard
open between messages (``fed_app.shard_store.open_shard``), so after the warm-up a
search costs Flower's messaging plus faiss.

Bytes per query are measured from the message contents of one un-timed call: requests
(query vectors + config, all shards) and replies (ids + distances of every shard),
both as array payload and as serialized protobuf (``recorddict_to_proto``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fed_app.federated_search import search_federation
from fed_app.federation import wait_for_nodes
from vector_index.datasets import load_glove
from vector_index.partition import iid
from vector_index.quantizers import IndexSpec, build_index, reference_codebooks, train_reference_index
from vector_index.store import Shard

BATCHES = (1, 100, 1000)
TIE_TOL = 1e-3  # shards round their distances to the node's grid (privacy distance_grid, 0.001): closer hits may swap


# -- measuring ----------------------------------------------------------------------


def content_bytes(content: RecordDict) -> tuple[int, int]:
    """(array payload bytes, serialized protobuf bytes) of a message's content."""
    payload = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    return payload, recorddict_to_proto(content).ByteSize()


class RecordingGrid:
    """A Grid that notes the size of every message sent and every good reply received."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent: list[tuple[int, int]] = []
        self.received: list[tuple[int, int]] = []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent += [content_bytes(m.content) for m in messages]
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.received += [content_bytes(r.content) for r in replies if not r.has_error()]
        return replies


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def topk_agreement(fed_d: np.ndarray, fed_i: np.ndarray, ref_d: np.ndarray, ref_i: np.ndarray, tol: float = 1e-4) -> tuple[float, float]:
    """(share of identical id slots, largest distance difference); slots that differ must
    be ties (an id the single index has at the same distance) or this raises."""
    same = fed_i == ref_i
    for q, j in zip(*np.nonzero(~same)):
        if not np.any((ref_i[q] == fed_i[q, j]) & (np.abs(ref_d[q] - fed_d[q, j]) <= tol)) and \
                not np.isclose(fed_d[q, j], ref_d[q, -1], atol=tol):
            raise AssertionError(f"query {q} rank {j}: federated id {fed_i[q, j]} ({fed_d[q, j]}) is not a tie of the single index's")
    return float(same.mean()), float(np.abs(fed_d - ref_d).max())


# -- the benchmark ------------------------------------------------------------------


def build_shards(root: Path, num_base: int, num_queries: int, num_shards: int, spec: IndexSpec, seed: int):
    data = load_glove(num_base=num_base, num_queries=num_queries, seed=seed)
    t = time.perf_counter()
    books, _ = reference_codebooks(spec, train_reference_index(spec, data.base, seed, add=False))
    t_train = time.perf_counter() - t
    for p, ids in enumerate(iid(data.base, num_shards, seed)):
        shard = Shard.create(root / f"client-{p}", data.base.shape[1], spec, codebooks=books, model_version=1,
                             metadata={"source": "benchmark_search"})
        shard.add(data.base[ids], ids)
        shard.save()
    single = build_index(spec, data.base, np.arange(data.base.shape[0], dtype=np.int64), books)
    return data, single, t_train


def make_bench_server(root: Path, num_shards: int, queries: np.ndarray, single: faiss.Index, k: int, reps: int, timeout: float, rows: list[dict]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = ConfigRecord({"deploy.shard-root": str(root)})
        wait_for_nodes(grid, num_shards, timeout)
        for b in BATCHES:
            q = np.ascontiguousarray(queries[:b])
            rec = RecordingGrid(grid)  # warm-up (first messages start workers) and byte count
            res = search_federation(rec, q, config, timeout, k=k)
            if res.missing:
                raise RuntimeError(f"batch {b}: shards {res.missing} did not answer")
            fed_s = median_seconds(lambda: search_federation(grid, q, config, timeout, k=k), reps)
            single.search(q, k)
            one_s = median_seconds(lambda: single.search(q, k), reps)
            ref_d, ref_i = single.search(q, k)
            same, ddiff = topk_agreement(res.distances, res.ids, ref_d, ref_i, tol=TIE_TOL)
            rows.append({
                "batch": b, "shards": len(res.answered), "fed_s": fed_s, "single_s": one_s,
                "req_payload": sum(p for p, _ in rec.sent) / b, "req_wire": sum(w for _, w in rec.sent) / b,
                "rep_payload": sum(p for p, _ in rec.received) / b, "rep_wire": sum(w for _, w in rec.received) / b,
                "same_ids": same, "max_ddiff": ddiff,
            })
            print(f"[benchmark_search] batch {b}: federated {fed_s * 1e3:.1f} ms, single {one_s * 1e3:.3f} ms", flush=True)

    return app


def table(rows: list[dict]) -> str:
    head = ("| batch | fed latency (ms) | single latency (ms) | fed/single | fed QPS | single QPS "
            "| request B/query (payload / wire) | reply B/query (payload / wire) | same ids | max |d diff| |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['fed_s'] * 1e3:.1f} | {r['single_s'] * 1e3:.3f} | {r['fed_s'] / r['single_s']:.1f}x "
            f"| {r['batch'] / r['fed_s']:.1f} | {r['batch'] / r['single_s']:.0f} "
            f"| {r['req_payload']:.0f} / {r['req_wire']:.0f} | {r['rep_payload']:.0f} / {r['rep_wire']:.0f} "
            f"| {r['same_ids']:.4f} | {r['max_ddiff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-base", type=int, default=100_000)
    ap.add_argument("--num-queries", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if max(BATCHES) > args.num_queries:
        ap.error(f"--num-queries must be >= {max(BATCHES)}")
    spec = IndexSpec("pq", m=args.m, nbits=args.nbits)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedvec-bench-search-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        data, single, t_train = build_shards(root, args.num_base, args.num_queries, args.shards, spec, args.seed)
        print(f"[benchmark_search] {data.base.shape[0]} x {data.base.shape[1]} GloVe vectors in {args.shards} shards, "
              f"PQ{args.m}x{args.nbits} trained centrally in {t_train:.1f}s, set-up {time.perf_counter() - t:.1f}s", flush=True)
        from fed_app.client_app import app as client_app
        from omegaconf import OmegaConf

        from fed_app.config import CONF_DIR
        from simulations import flower_engine

        flower_engine.install(float(OmegaConf.load(CONF_DIR / "config.yaml").engine_poll_s))  # as simulations.run does
        logging.getLogger("flwr").setLevel(logging.WARNING)
        t = time.perf_counter()
        run_simulation(
            server_app=make_bench_server(root, args.shards, data.queries, single, args.k, args.reps, args.timeout, rows),
            client_app=client_app,
            num_supernodes=args.shards,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"logging_level": "ERROR", "log_to_driver": True}},
        )
        wall = time.perf_counter() - t
    if len(rows) != len(BATCHES):
        raise SystemExit(f"the benchmark ServerApp did not finish ({len(rows)} of {len(BATCHES)} batch sizes); see the log above")
    print(f"\nFederated search ({args.shards} shards, fedvec's ClientApp, Flower simulation engine) vs one faiss "
          f"index; k={args.k}, median of {args.reps}; faiss threads in the server process: {faiss.omp_get_max_threads()}; "
          f"simulation wall time {wall:.0f}s\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
