"""Command line for a local shard: ``python -m vector_index {import,info,search,delete,reencode,rollback,migrate,export-lancedb}``.

``import`` reads .npy/.fvecs files or a collection of Milvus Lite, Qdrant or LanceDB.

Errors print one line to stderr and exit with status 2. Every verb commits at most one
new version, at its end: a failed command writes nothing and removes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .connectors import is_source_uri, read_source
from .quantizers import IndexSpec, reference_codebooks, train_reference_index
from .store import Shard
from .validation import KINDS, VectorError
from .vector_files import read_ids, read_vectors

SPEC_OPTIONS = ("m", "nbits", "nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "beam_size", "ils_iters")


def read_model(path: str) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray] | None, int | None]:
    """Codebooks (+ encoder) from an .npz: keys ``pq``/``coarse`` (or ``level.*``), ``A``/``b``
    (or ``transform.*``) and an optional scalar ``model_version``."""
    p = Path(path)
    if not p.is_file():
        raise VectorError(f"codebooks: file {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k.split(".", 1)[-1]: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise VectorError(f"codebooks: {str(p)!r} is not a readable .npz ({exc})") from None
    transform = (arrays.pop("A"), arrays.pop("b")) if "A" in arrays else None
    version = arrays.pop("model_version", None)
    if version is not None and (version.shape != () or version.dtype.kind not in "iu"):
        raise VectorError(f"codebooks: model_version in {str(p)!r} must be one integer, got {version!r}")
    return arrays, transform, None if version is None else int(version)


def spec_from_args(args: argparse.Namespace) -> IndexSpec:
    given = {k: getattr(args, k) for k in SPEC_OPTIONS if getattr(args, k) is not None}
    return IndexSpec(args.index or "flat", **given)


def check_spec_matches(shard: Shard, args: argparse.Namespace) -> None:
    """Options given for an existing shard must agree with it (they cannot change it)."""
    asked = {k: getattr(args, k) for k in ("index", *SPEC_OPTIONS) if getattr(args, k) is not None}
    have = {**shard.spec.to_dict(), "index": shard.spec.kind}
    differ = {k: (v, have[k]) for k, v in asked.items() if have[k] != v}
    if differ:
        detail = ", ".join(f"--{k.replace('_', '-')} {v} (shard has {h})" for k, (v, h) in differ.items())
        raise VectorError(f"{shard.path}: existing shard differs from the options: {detail}")


def train_local(shard: Shard, seed: int) -> None:
    """Codebooks trained by faiss on this shard alone (for use without a federation)."""
    x = shard.vectors(shard.ids)
    books, transform = reference_codebooks(shard.spec, train_reference_index(shard.spec, x, seed))
    shard.reencode(books, transform, model_version=0 if shard.model_version is None else shard.model_version + 1)


def read_input(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
    """(vectors, ids or None) from a file, or from a database named by a source URI."""
    if is_source_uri(args.vectors):
        if args.ids:
            raise VectorError("--ids: a database source brings its own ids; drop --ids")
        return read_source(args.vectors, batch_size=args.batch_size)
    return read_vectors(args.vectors), read_ids(args.ids) if args.ids else None


def cmd_import(args: argparse.Namespace) -> None:
    x, ids = read_input(args)
    root = Path(args.shard)
    if Shard.exists(root):
        shard = Shard.open(root)
        check_spec_matches(shard, args)
        if args.codebooks:
            books, transform, version = read_model(args.codebooks)
            shard.reencode(books, transform, version if version is not None else (shard.model_version or 0) + 1)
    else:  # nothing is written before the one commit at the end
        books, transform, version = read_model(args.codebooks) if args.codebooks else (None, None, None)
        shard = Shard.create(root, x.shape[1], spec_from_args(args), codebooks=books, transform=transform,
                             model_version=version, commit=False)
    if args.upsert:
        if ids is None:
            raise VectorError("--upsert needs --ids (which vectors to replace)")
        shard.upsert(x, ids)
    else:
        ids = shard.add(x, ids)
    if args.train_local:
        train_local(shard, args.seed)
    shard.save()
    print(f"{'upserted' if args.upsert else 'added'} {x.shape[0]} vectors (ids {ids.min()}..{ids.max()}) "
          f"into {root}: {len(shard)} vectors, {shard.spec.kind}, version {shard.version}")


def cmd_info(args: argparse.Namespace) -> None:
    shard = Shard.open(args.shard, version=args.version)
    header = {"index": shard.spec.to_dict(), "dim": shard.dim, "count": len(shard), "encoded": shard.encoded,
              "model_version": shard.model_version, "version": shard.version, "metadata": shard.metadata}
    print(json.dumps({"shard": header, "stats": shard.stats(), "versions": shard.history()}, indent=2, sort_keys=True))


def cmd_rollback(args: argparse.Namespace) -> None:
    version = int(args.version) if args.version.isdigit() else args.version
    shard = Shard.restore(args.shard, version)
    print(f"rolled {args.shard} back to version {args.version} ({len(shard)} vectors, model version "
          f"{shard.model_version}) as new version {shard.version}; later versions are kept")


def cmd_migrate(args: argparse.Namespace) -> None:
    from .legacy_format import migrate

    shard = migrate(Path(args.old), Path(args.new))
    print(f"migrated {args.old} to {args.new}: {len(shard)} vectors, {shard.spec.kind}, model version "
          f"{shard.model_version}, version {shard.version}; {args.old} is unchanged")


def cmd_search(args: argparse.Namespace) -> None:
    shard = Shard.open(args.shard)
    q = read_vectors(args.queries, "queries")
    distances, ids = shard.search(q, args.k)
    if args.out:
        np.savez(args.out, distances=distances, ids=ids)
        print(f"wrote {q.shape[0]} x {args.k} results to {args.out}")
    shown = q.shape[0] if args.show is None else min(args.show, q.shape[0])
    for i in range(shown):
        print(f"{i}\t" + " ".join(f"{j}:{d:.6g}" for j, d in zip(ids[i], distances[i]) if j >= 0))


def cmd_delete(args: argparse.Namespace) -> None:
    if (args.ids is None) == (args.ids_file is None):
        raise VectorError("give the ids to delete with exactly one of --ids or --ids-file")
    ids = np.array(args.ids, dtype=np.int64) if args.ids is not None else read_ids(args.ids_file)
    shard = Shard.open(args.shard)
    shard.delete(ids)
    shard.save()
    print(f"deleted {np.unique(ids).size} vectors from {args.shard}: {len(shard)} left, version {shard.version}")


def cmd_reencode(args: argparse.Namespace) -> None:
    shard = Shard.open(args.shard)
    books, transform, version = read_model(args.codebooks)
    if args.model_version is not None:
        version = args.model_version
    if version is None:
        raise VectorError("model version unknown: pass --model-version or store model_version in the .npz")
    shard.reencode(books, transform, version)
    shard.save()
    print(f"re-encoded {len(shard)} vectors of {args.shard} with model version {version}, version {shard.version}")


def cmd_export_lancedb(args: argparse.Namespace) -> None:
    from .lancedb_export import export_lancedb

    shard = Shard.open(args.shard)
    out = export_lancedb(shard, args.dest, args.table or Path(args.shard).resolve().name, overwrite=args.overwrite)
    print(f"wrote table {out['table']!r} ({out['rows']} rows) to {args.dest}: IVF_PQ on {out['vector_column']!r} from the shard's "
          f"codebooks (model version {out['model_version']}, {out['partitions']} partition(s), PQ{out['sub_vectors']}x{out['nbits']}), "
          f"search it with nprobes={out['nprobe']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vector_index", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="create a shard or add vectors to it")
    imp.add_argument("vectors", help=".npy or .fvecs file of float vectors, or a database: milvus:///path/milvus.db?collection=NAME, "
                     "qdrant:///path?collection=NAME, lancedb:///path?table=NAME (ids kept; see vector_index/connectors.py)")
    imp.add_argument("--batch-size", type=int, default=10_000, help="rows read per request from a database source")
    imp.add_argument("shard", help="shard directory (created if missing)")
    imp.add_argument("--ids", help=".npy or .ivecs ids (default: numbered after the largest id)")
    imp.add_argument("--upsert", action="store_true", help="replace vectors whose ids exist")
    imp.add_argument("--index", choices=list(KINDS),
                     help="index kind of a new shard (default flat)")
    for name, what in (("m", "PQ sub-spaces"), ("nbits", "bits per PQ code"), ("nlist", "IVF lists"),
                       ("nprobe", "IVF lists searched"), ("hnsw_m", "HNSW neighbours"),
                       ("ef_search", "HNSW search beam"), ("ef_construction", "HNSW build beam"),
                       ("beam_size", "RQ encoding beam"), ("ils_iters", "LSQ local-search iterations")):
        imp.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=what)
    imp.add_argument("--codebooks", help=".npz with the global codebooks (pq, coarse, A, b, model_version)")
    imp.add_argument("--train-local", action="store_true", help="train codebooks on this shard alone with faiss")
    imp.add_argument("--seed", type=int, default=0)
    imp.set_defaults(run=cmd_import)

    info = sub.add_parser("info", help="print the shard's description, stats and kept versions as JSON")
    info.add_argument("shard")
    info.add_argument("--version", type=int, help="describe this kept version instead of the latest")
    info.set_defaults(run=cmd_info)

    back = sub.add_parser("rollback", help="make an older kept version current again (committed as a new version)")
    back.add_argument("shard")
    back.add_argument("--version", required=True, help="version number or tag (e.g. model-1700000000); see info")
    back.set_defaults(run=cmd_rollback)

    mig = sub.add_parser("migrate", help="convert a shard of fedvec's old directory format to a Lance shard")
    mig.add_argument("old", help="old-format shard directory (left unchanged)")
    mig.add_argument("new", help="new shard directory (must not exist or be empty)")
    mig.set_defaults(run=cmd_migrate)

    srch = sub.add_parser("search", help="k nearest neighbours of each query")
    srch.add_argument("shard")
    srch.add_argument("queries", help=".npy or .fvecs file of queries")
    srch.add_argument("-k", type=int, default=10)
    srch.add_argument("--out", help="write distances and ids to this .npz")
    srch.add_argument("--show", type=int, help="print only the first N queries' results")
    srch.set_defaults(run=cmd_search)

    dele = sub.add_parser("delete", help="remove vectors by id")
    dele.add_argument("shard")
    dele.add_argument("--ids", type=int, nargs="+")
    dele.add_argument("--ids-file")
    dele.set_defaults(run=cmd_delete)

    reen = sub.add_parser("reencode", help="re-encode with new global codebooks")
    reen.add_argument("shard")
    reen.add_argument("codebooks", help=".npz (pq, coarse, A, b, model_version)")
    reen.add_argument("--model-version", type=int)
    reen.set_defaults(run=cmd_reencode)
    exp = sub.add_parser("export-lancedb", help="write the shard as a LanceDB table indexed with its federated codebook")
    exp.add_argument("shard")
    exp.add_argument("dest", help="LanceDB database directory (created if missing)")
    exp.add_argument("--table", help="table name (default: the shard directory's name)")
    exp.add_argument("--overwrite", action="store_true", help="replace the table if it exists")
    exp.set_defaults(run=cmd_export_lancedb)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (VectorError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
