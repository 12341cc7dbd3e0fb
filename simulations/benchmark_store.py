"""What the persistent store costs over the same faiss index used directly, on GloVe,
and what it costs next to the store's previous on-disk format.

For each index kind the codebooks are trained centrally by faiss once (this measures
the store, not training) and injected both into a :class:`vector_index.store.Shard`
and into a bare faiss index of the same construction. First table, per kind: batch
search QPS (median of repetitions, interleaved store/faiss so machine noise hits both),
the store's search overhead, recall 10@10 against exact search, add throughput of
both, and save time.

Second table, per kind: the Lance store ("new") against format 1, the hand-written
directory format it replaced ("f1", re-created by ``simulations.legacy_store``), each
with the ratio new/f1. Every repetition runs, for both stores, the same chain on a
fresh directory: *import* (create a shard of ``--num-base`` vectors and save it, as
``python -m vector_index import`` does: one commit), *open* that shard until it can
search, *incremental import* (add 10% more vectors to the opened shard and save),
*re-encode* with a second model (another seed's codebooks) and save. The two stores
take turns step by step, the one going first alternating between repetitions;
medians are reported. Import throughputs are vectors per second (a ratio above 1:
the new store is faster); re-encode and open are seconds (below 1: faster). B/vec is
the version just imported, on disk, per vector. Both opens verify checksums; files are
read back from the page cache. Format 1 fsyncs every file and directory it writes;
Lance's local commits do not fsync (lance 14, seen with strace), which is part of the
difference in writes. ``--threads`` sets faiss's threads; Lance uses its own pool.

    python -m simulations.benchmark_store [--num-base 100000] [--threads 1] [--reps 5]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from vector_index.datasets import load_glove
from vector_index.quantizers import IndexSpec, empty_index, reference_codebooks, train_reference_index, with_transform
from vector_index.store import Shard

from . import legacy_store

KINDS = ("flat", "pq", "ivfpq", "hnsw", "hnswpq", "opqpq")


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """10@10: the fraction of the true 10 nearest found among the 10 returned."""
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def central_model(spec: IndexSpec, train: np.ndarray, seed: int) -> tuple[dict, tuple | None]:
    """(codebooks, transform) trained by faiss on ``train``."""
    return reference_codebooks(spec, train_reference_index(spec, train, seed=seed, add=False))


def bench_kind(spec: IndexSpec, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, model: tuple,
               workdir: Path, k: int, reps: int, batch: int) -> dict:
    d = base.shape[1]
    ids = np.arange(base.shape[0], dtype=np.int64)
    books, transform = model

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
    med_raw, med_store = float(np.median(times_raw)), float(np.median(times_store))
    return {
        "kind": spec.kind, "qps_faiss": len(queries) / med_raw, "qps_store": len(queries) / med_store,
        "overhead_pct": 100 * (med_store / med_raw - 1), "recall": recall_at(found, truth), "same_ids": same,
        "add_faiss": base.shape[0] / t_raw, "add_store": base.shape[0] / t_store, "save_s": t_save,
    }


class NewStore:
    """The chain of steps on :class:`vector_index.store.Shard` (Lance)."""

    name = "new"

    def __init__(self, root: Path) -> None:
        self.root, self.shard = root, None

    def import_(self, spec, base, ids, books, transform) -> None:
        self.shard = Shard.create(self.root, base.shape[1], spec, codebooks=books, transform=transform, model_version=0,
                                  commit=False)
        self.shard.add(base, ids)
        self.shard.save()

    def open(self) -> None:
        self.shard = Shard.open(self.root)

    def add(self, x, ids) -> None:
        self.shard.add(x, ids)
        self.shard.save()

    def reencode(self, books, transform) -> None:
        self.shard.reencode(books, transform, model_version=1)
        self.shard.save()

    def search(self, queries, k):
        return self.shard.search(queries, k)

    def disk_bytes(self) -> int:
        return self.shard.stats()["bytes_on_disk"]


class OldStore:
    """The same chain on format 1 (``simulations.legacy_store``)."""

    name = "f1"

    def __init__(self, root: Path) -> None:
        self.root, self.shard = root, None

    def import_(self, spec, base, ids, books, transform) -> None:
        self.shard = legacy_store.create(self.root, spec, base, ids, books, transform, model_version=0)
        legacy_store.save(self.shard)

    def open(self) -> None:
        self.shard = legacy_store.open_shard(self.root)

    def add(self, x, ids) -> None:
        legacy_store.add(self.shard, x, ids)
        legacy_store.save(self.shard)

    def reencode(self, books, transform) -> None:
        legacy_store.reencode(self.shard, books, transform, model_version=1)
        legacy_store.save(self.shard)

    def search(self, queries, k):
        return self.shard.index.search(queries, k)

    def disk_bytes(self) -> int:
        return legacy_store.disk_bytes(self.root)


STEPS = ("import", "open", "incremental", "reencode")


def bench_formats(spec: IndexSpec, base: np.ndarray, extra: np.ndarray, queries: np.ndarray, model: tuple,
                  new_model: tuple, workdir: Path, k: int, reps: int) -> dict:
    """New store vs format 1: import with ``model``, open, incremental import, re-encode with
    ``new_model`` (see the module doc)."""
    ids = np.arange(base.shape[0], dtype=np.int64)
    extra_ids = np.arange(base.shape[0], base.shape[0] + extra.shape[0], dtype=np.int64)
    (books, transform), (books2, transform2) = model, new_model
    run = {
        "import": lambda s: s.import_(spec, base, ids, books, transform),
        "open": lambda s: s.open(),
        "incremental": lambda s: s.add(extra, extra_ids),
        "reencode": lambda s: s.reencode(books2, transform2),
    }
    times = {(step, side): [] for step in STEPS for side in ("new", "f1")}
    disk: dict[str, int] = {}
    agree = 0.0
    for rep in range(reps):
        stores = [NewStore(workdir / f"{spec.kind}-new-{rep}"), OldStore(workdir / f"{spec.kind}-f1-{rep}")]
        if rep % 2:
            stores.reverse()
        for step in STEPS:
            for store in stores:
                gc.collect()
                times[(step, store.name)].append(timed(lambda: run[step](store)))
                if step == "import":
                    disk[store.name] = store.disk_bytes()
        found = {store.name: store.search(queries[:200], k)[1] for store in stores}
        agree = float(np.mean(found["new"] == found["f1"]))  # the same shard content in both: the same answers
        for store in stores:
            store.shard = None
            shutil.rmtree(store.root)
    med = {key: float(np.median(v)) for key, v in times.items()}
    row = {"kind": spec.kind, "agree": agree}
    for side in ("new", "f1"):
        row[f"import_{side}"] = base.shape[0] / med[("import", side)]
        row[f"incr_{side}"] = extra.shape[0] / med[("incremental", side)]
        row[f"reencode_{side}"] = med[("reencode", side)]
        row[f"open_{side}"] = med[("open", side)]
        row[f"disk_{side}"] = disk[side] / base.shape[0]
    for key in ("import", "incr", "reencode", "open", "disk"):
        row[f"{key}_x"] = row[f"{key}_new"] / row[f"{key}_f1"]
    return row


SEARCH_COLUMNS = [("kind", "kind", "{}"), ("qps_faiss", "QPS faiss", "{:.0f}"), ("qps_store", "QPS store", "{:.0f}"),
                  ("overhead_pct", "overhead %", "{:+.1f}"), ("recall", "R10@10", "{:.3f}"), ("same_ids", "same ids", "{:.3f}"),
                  ("add_faiss", "add/s faiss", "{:.0f}"), ("add_store", "add/s store", "{:.0f}"), ("save_s", "save s", "{:.2f}")]
FORMAT_COLUMNS = [("kind", "kind", "{}")] + [
    col for key, title, fmt in (("import", "import/s", "{:.0f}"), ("incr", "incr/s", "{:.0f}"), ("reencode", "reenc s", "{:.3f}"),
                                ("open", "open s", "{:.3f}"), ("disk", "B/vec", "{:.1f}"))
    for col in ((f"{key}_new", f"{title} new", fmt), (f"{key}_f1", f"{title} f1", fmt), (f"{key}_x", "x", "{:.2f}"))
] + [("agree", "same ids", "{:.3f}")]


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
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
    p.add_argument("--reps", type=int, default=5, help="repetitions of each timing (search, and each store step)")
    p.add_argument("--batch", type=int, default=10_000, help="vectors per add call, the same for both sides")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--no-formats", action="store_true", help="skip the comparison with format 1 (second table)")
    args = p.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    # the first num_base rows are the same as with num_base alone; the rest is the incremental import
    data = load_glove(num_base=args.num_base + args.num_base // 10, num_queries=args.num_queries, seed=0)
    base, extra = data.base[: args.num_base], data.base[args.num_base:]
    exact = faiss.IndexFlatL2(base.shape[1])
    exact.add(base)
    truth = exact.search(data.queries, args.k)[1]
    train = base[np.random.default_rng(0).permutation(len(base))[: args.num_train]]
    print(f"GloVe-6B-50d: {len(base)} base, {len(data.queries)} queries, k={args.k}, "
          f"{args.threads} thread(s), PQ 10x8, IVF256 nprobe 16, HNSW32 efSearch 64, median of {args.reps}")
    rows, format_rows = [], []
    with tempfile.TemporaryDirectory(prefix="fedvec-bench-") as tmp:
        for kind in args.kinds:
            spec = IndexSpec(kind, m=10, nbits=8, nlist=256, nprobe=16, hnsw_m=32, ef_search=64, ef_construction=40)
            model = central_model(spec, train, seed=0)
            rows.append(bench_kind(spec, base, data.queries, truth, model, Path(tmp), args.k, args.reps, args.batch))
            if not args.no_formats:  # the new model: the same training, another seed
                format_rows.append(bench_formats(spec, base, extra, data.queries, model, central_model(spec, train, seed=1),
                                                 Path(tmp), args.k, args.reps))
            print(f"  {kind}: done", flush=True)
    print()
    print_table(rows, SEARCH_COLUMNS)
    if format_rows:
        print(f"\nLance store (new) vs format 1 (f1), x = new/f1: import {args.num_base} vectors and save, open it, "
              f"incremental import of {extra.shape[0]} more and save, re-encode with a new model and save")
        print_table(format_rows, FORMAT_COLUMNS)
    return rows + format_rows


if __name__ == "__main__":
    main()
