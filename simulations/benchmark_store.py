"""What the persistent store costs over the same faiss index used directly, on GloVe.

For each index kind the codebooks are trained centrally by faiss once (this measures
the store, not training) and injected both into a :class:`vector_index.store.Shard`
and into a bare faiss index of the same construction. Reported per kind: batch search
QPS (median of repetitions, interleaved store/faiss so machine noise hits both), the
store's search overhead, recall 10@10 against exact search, add throughput of both,
save time, and bytes per vector on disk (whole version, and the index file alone).

    python -m simulations.benchmark_store [--num-base 100000] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from vector_index.datasets import load_glove
from vector_index.quantizers import IndexSpec, empty_index, reference_codebooks, train_reference_index, with_transform
from vector_index.store import Shard

KINDS = ("flat", "pq", "ivfpq", "hnsw", "hnswpq", "opqpq")


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """10@10: the fraction of the true 10 nearest found among the 10 returned."""
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_kind(spec: IndexSpec, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, train: np.ndarray,
               workdir: Path, k: int, reps: int, batch: int) -> dict:
    d = base.shape[1]
    ids = np.arange(base.shape[0], dtype=np.int64)
    books, transform = reference_codebooks(spec, train_reference_index(spec, train, seed=0, add=False))

    raw = empty_index(spec, d, books)
    raw = with_transform(raw, *transform) if transform is not None else raw
    shard = Shard.create(workdir / spec.kind, d, spec, codebooks=books, transform=transform, model_version=0)
    batches = range(0, base.shape[0], batch)
    t_raw = timed(lambda: [raw.add_with_ids(base[i:i + batch], ids[i:i + batch]) for i in batches])
    t_store = timed(lambda: [shard.add(base[i:i + batch], ids[i:i + batch]) for i in batches])
    t_save = timed(shard.save)

    raw.search(queries[:100], k), shard.search(queries[:100], k)  # warm-up, untimed
    times_raw, times_store = [], []
    for _ in range(reps):  # interleaved, so a noisy neighbour slows both sides alike
        times_raw.append(timed(lambda: raw.search(queries, k)))
        times_store.append(timed(lambda: shard.search(queries, k)))
    _, found_raw = raw.search(queries, k)
    _, found = shard.search(queries, k)
    same = float(np.mean(found == found_raw))
    stats = shard.stats()
    index_file = (workdir / spec.kind / f"v{shard.version:06d}" / "index.faiss").stat().st_size
    med_raw, med_store = float(np.median(times_raw)), float(np.median(times_store))
    return {
        "kind": spec.kind, "qps_faiss": len(queries) / med_raw, "qps_store": len(queries) / med_store,
        "overhead_pct": 100 * (med_store / med_raw - 1), "recall": recall_at(found, truth), "same_ids": same,
        "add_faiss": base.shape[0] / t_raw, "add_store": base.shape[0] / t_store, "save_s": t_save,
        "disk_bpv": stats["bytes_on_disk"] / len(shard), "index_bpv": index_file / len(shard),
    }


def print_table(rows: list[dict]) -> None:
    cols = [("kind", "kind", "{}"), ("qps_faiss", "QPS faiss", "{:.0f}"), ("qps_store", "QPS store", "{:.0f}"),
            ("overhead_pct", "overhead %", "{:+.1f}"), ("recall", "R10@10", "{:.3f}"), ("same_ids", "same ids", "{:.3f}"),
            ("add_faiss", "add/s faiss", "{:.0f}"), ("add_store", "add/s store", "{:.0f}"), ("save_s", "save s", "{:.2f}"),
            ("disk_bpv", "disk B/vec", "{:.1f}"), ("index_bpv", "index B/vec", "{:.1f}")]
    cells = [[c[1] for c in cols]] + [[fmt.format(r[key]) for key, _, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-base", type=int, default=100_000)
    p.add_argument("--num-queries", type=int, default=2000)
    p.add_argument("--num-train", type=int, default=30_000, help="training sample for the central codebooks")
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads, the same for both sides")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=10_000, help="vectors per add call, the same for both sides")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = p.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    data = load_glove(num_base=args.num_base, num_queries=args.num_queries, seed=0)
    exact = faiss.IndexFlatL2(data.base.shape[1])
    exact.add(data.base)
    truth = exact.search(data.queries, args.k)[1]
    train = data.base[np.random.default_rng(0).permutation(len(data.base))[: args.num_train]]
    print(f"GloVe-6B-50d: {len(data.base)} base, {len(data.queries)} queries, k={args.k}, "
          f"{args.threads} thread(s), PQ 10x8, IVF256 nprobe 16, HNSW32 efSearch 64, median of {args.reps}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedvec-bench-") as tmp:
        for kind in args.kinds:
            spec = IndexSpec(kind, m=10, nbits=8, nlist=256, nprobe=16, hnsw_m=32, ef_search=64, ef_construction=40)
            rows.append(bench_kind(spec, data.base, data.queries, truth, train, Path(tmp), args.k, args.reps, args.batch))
            print(f"  {kind}: done", flush=True)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
