"""A shard on disk: one Lance dataset, versioned by Lance, checked by fedvec.

A shard directory holds::

    data.lance/   the Lance dataset. Columns: id int64, vector float32[d], and, for pq,
                  ivfpq and opqpq once a global model is in, code (faiss's standalone code
                  of each vector under that model). Schema metadata: ``fedvec.header``
                  (JSON: format, dim, index spec, model_version, encoded, user metadata)
                  and ``fedvec.model`` (base64 .npz of the codebooks and the encoder).
    graphs/       faiss HNSW indexes (hnsw, hnswpq), one file per data version needing one
    LOCK          flock'ed by a writer while it commits

Every fedvec commit is one Lance transaction (create, append or overwrite). Its
transaction properties carry the sha256 of the version's whole content (header, model,
ids, vectors, codes) and the name and sha256 of its graph file. Opening recomputes the
digest, so changed bytes, a version Lance wrote for another program, or a missing
record are refused rather than read. Lance's own manifest-last commit keeps a crash or a
full disk from damaging the previous version; Lance does not fsync, so a commit fsyncs
the files it wrote before returning (a power cut during a save can leave the newest
version unreadable: it is refused, and ``rollback`` returns to the one before). The lock
plus a version check makes a writer that opened an older version fail instead of
overwriting another's commit.

A model install is tagged ``model-<model_version>``, which also keeps that version from
being cleaned up; besides tagged versions the last ``KEEP_VERSIONS`` are kept.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from .validation import VectorError

FORMAT = 2  # 1 was the hand-written directory format (see legacy_format, migrate)
DATA, GRAPHS, LOCK = "data.lance", "graphs", "LOCK"
KEEP_VERSIONS = 8  # untagged versions kept for rollback besides the model tags
KEEP_MODEL_TAGS = 3  # model-<v> tags kept (older ones are dropped, their versions then cleaned)
PROPERTY = "fedvec"


class ShardError(VectorError):
    """A shard directory that is missing, tampered with, written concurrently, or not writable."""


@dataclass
class Snapshot:
    """One version's content, as the store holds it in memory."""

    header: dict[str, Any]  # format, dim, index, model_version, encoded, metadata, shard_created
    model: dict[str, np.ndarray]  # "level.<name>" codebooks, "transform.A"/"transform.b"
    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, d]
    codes: np.ndarray | None  # uint8 [n, code size], or None when the kind keeps no codes
    graph: bytes | None = None  # serialized faiss index of hnsw kinds


def _lance():
    import lance  # imported here: a shard's numerics do not need it

    return lance


def _plain(exc: BaseException) -> str:
    """Lance's error text without its Rust source locations, on one line."""
    text = " ".join(str(exc).split())
    return text.split(", /home/runner/")[0].split(", /")[0][:300]


def is_shard(root: Path) -> bool:
    return (root / DATA).is_dir()


def is_legacy(root: Path) -> bool:
    """A shard of the hand-written format 1 (see legacy_format)."""
    return (root / "CURRENT").is_file()


def digest(snap: Snapshot) -> str:
    """sha256 over everything a version holds, in storage order."""
    h = hashlib.sha256(json.dumps(snap.header, sort_keys=True).encode())
    for name in sorted(snap.model):
        arr = np.ascontiguousarray(snap.model[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.tobytes())
    for arr in (snap.ids, snap.vectors, snap.codes):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _model_text(model: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **model)
    return base64.b64encode(buf.getvalue()).decode()


def _model_of(text: str, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise ShardError(f"{where}: the stored model is unreadable ({exc})") from None


def _table(snap: Snapshot, rows: slice | None = None):
    import pyarrow as pa

    rows = rows or slice(None)
    ids, vectors = snap.ids[rows], snap.vectors[rows]
    dim = int(snap.header["dim"])
    fields = [pa.field("id", pa.int64(), nullable=False), pa.field("vector", pa.list_(pa.float32(), dim))]
    columns = [pa.array(ids, pa.int64()), pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim)]
    if snap.codes is not None:
        width = int(snap.codes.shape[1])
        fields.append(pa.field("code", pa.binary(width)))
        codes = np.ascontiguousarray(snap.codes[rows])
        columns.append(pa.Array.from_buffers(pa.binary(width), len(ids), [None, pa.py_buffer(codes.tobytes())]))
    meta = {"fedvec.header": json.dumps(snap.header, sort_keys=True), "fedvec.model": _model_text(snap.model)}
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=meta))


def _arrays(table, dim: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = table.num_rows
    try:
        ids = table.column("id").to_numpy().astype(np.int64, copy=False)
        flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = np.ascontiguousarray(flat, dtype=np.float32).reshape(n, dim)
        codes = None
        if "code" in table.column_names:
            col = table.column("code").combine_chunks()
            if col.null_count:
                raise ShardError(f"{where}: {col.null_count} rows have no code")
            width = col.type.byte_width
            raw = np.frombuffer(col.buffers()[1], dtype=np.uint8)
            codes = raw[col.offset * width:(col.offset + n) * width].reshape(n, width).copy()
    except (KeyError, ValueError) as exc:
        raise ShardError(f"{where}: columns do not match a fedvec shard ({exc})") from None
    return ids, vectors, codes


def _record(ds, version: int) -> dict[str, Any] | None:
    txn = ds.read_transaction(version)
    props = getattr(txn, "transaction_properties", None) or {}
    if PROPERTY not in props:
        return None
    try:
        record = json.loads(props[PROPERTY])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _open_dataset(root: Path, version: int | str | None):
    if not root.is_dir():
        raise ShardError(f"shard directory {str(root)!r} does not exist")
    if not is_shard(root):
        if is_legacy(root):
            raise ShardError(f"{str(root)!r} is a shard in fedvec's old directory format; convert it with "
                             f"`python -m vector_index migrate {root} NEW_DIR`")
        raise ShardError(f"{str(root)!r} is not a shard directory (no {DATA}); create one first")
    try:
        return _lance().dataset(str(root / DATA), version=version)
    except (OSError, ValueError, RuntimeError) as exc:
        kept = ", ".join(str(v["version"]) for v in _lance().dataset(str(root / DATA)).versions()) if version is not None else ""
        hint = f" (kept: {kept})" if kept else ""
        raise ShardError(f"{str(root)!r}: cannot open version {version if version is not None else 'latest'}{hint}: {_plain(exc)}") from None


def read(root: Path, version: int | str | None = None, verify: bool = True) -> tuple[int, Snapshot, dict[str, Any]]:
    """(version number, content, commit record) of the latest or a given version (number or tag)."""
    ds = _open_dataset(root, version)
    number = int(ds.version)
    where = f"{root} version {number}"
    record = _record(ds, number)
    if record is None:
        raise ShardError(f"{where} was not committed by fedvec (no integrity record); open an earlier version "
                         f"with `python -m vector_index rollback {root} --version N` (see `info` for versions)")
    meta = ds.schema.metadata or {}
    try:
        header = json.loads(meta[b"fedvec.header"])
    except (KeyError, json.JSONDecodeError):
        raise ShardError(f"{where}: no fedvec header in the schema metadata") from None
    if not isinstance(header.get("format"), int) or header["format"] > FORMAT:
        raise ShardError(f"{where}: format {header.get('format')!r} is newer than this fedvec supports ({FORMAT}); "
                         "upgrade fedvec to open this shard")
    model = _model_of(meta.get(b"fedvec.model", b"").decode(), where)
    try:
        table = ds.to_table()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ShardError(f"{where}: data files are unreadable ({_plain(exc)})") from None
    ids, vectors, codes = _arrays(table, int(header["dim"]), where)
    graph = None
    if record.get("graph"):
        path = root / GRAPHS / record["graph"]
        try:
            graph = path.read_bytes()
        except OSError:
            raise ShardError(f"{path}: missing (the faiss graph of version {number})") from None
        if verify and hashlib.sha256(graph).hexdigest() != record.get("graph_sha256"):
            raise ShardError(f"{path}: sha256 differs from the record of version {number} (corrupted or replaced)")
    snap = Snapshot(header, model, ids, vectors, codes, graph)
    if verify and digest(snap) != record.get("digest"):
        raise ShardError(f"{where}: content differs from its integrity record (tampered or corrupted); "
                         "an earlier version may still be intact, see `python -m vector_index info`")
    return number, snap, record


def latest(root: Path) -> int | None:
    """The newest committed version, or None for a shard not created yet."""
    if not is_shard(root):
        return None
    return int(_lance().dataset(str(root / DATA)).latest_version)


def stamp(root: Path) -> frozenset[str]:
    """The names of the dataset's version manifests: a commit always adds a manifest
    under a name never used before, so an unchanged stamp means no commit in between
    (a directory listing, ~100x cheaper than opening the dataset for its version)."""
    try:
        return frozenset(os.listdir(root / DATA / "_versions"))
    except FileNotFoundError:
        return frozenset()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One committer at a time per shard directory (an advisory flock on LOCK)."""
    with open(root / LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_graph(root: Path, graph: bytes) -> tuple[str, str]:
    (root / GRAPHS).mkdir(exist_ok=True)
    name = f"{uuid.uuid4().hex}.faiss"
    with open(root / GRAPHS / name, "wb") as f:
        f.write(graph)
        f.flush()
        os.fsync(f.fileno())
    return name, hashlib.sha256(graph).hexdigest()


def commit(root: Path, snap: Snapshot, base: int, appended_from: int | None, operation: str, tag: str | None = None) -> int:
    """Write ``snap`` as the next version after ``base`` (0: a new shard); returns its number.

    ``appended_from`` = rows already stored in ``base`` when the change only appends
    (Lance then writes the new rows only); None rewrites the version. Refused if another
    writer committed after ``base``; any failure leaves ``base`` the latest version.
    """
    lance = _lance()
    graph_name = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            now = latest(root)
            if base == 0 and now is not None:
                raise ShardError(f"{str(root)!r} was created by another writer meanwhile (now at version {now}); "
                                 "nothing was written: open it and reapply the changes")
            if base and now != base:
                raise ShardError(f"{str(root)!r} was saved by another writer (now version {now}, opened version {base}); "
                                 "nothing was written: reopen and reapply the changes")
            record = {"digest": digest(snap), "count": int(snap.ids.size), "operation": operation,
                      "model_version": snap.header.get("model_version"), "time": time.time()}
            if snap.graph is not None:
                graph_name, record["graph_sha256"] = _write_graph(root, snap.graph)
                record["graph"] = graph_name
            append = base and appended_from is not None
            table = _table(snap, slice(appended_from, None) if append else None)
            started = time.time()
            ds = lance.write_dataset(table, str(root / DATA), mode="append" if append else ("overwrite" if base else "create"),
                                     transaction_properties={PROPERTY: json.dumps(record)})
            _sync_written(root / DATA, started)
            number = int(ds.version)
            graph_name = None  # committed: the file belongs to the version now
            if tag:
                _move_tag(ds, tag, number)
            _cleanup(root, ds)
            return number
    except ShardError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        state = f"the shard still holds version {base}" if base else "no shard was created"
        raise ShardError(f"{str(root)!r}: could not commit ({_plain(exc)}); {state}") from None
    finally:
        if graph_name is not None:  # written for a commit that did not happen
            (root / GRAPHS / graph_name).unlink(missing_ok=True)


def _sync_written(dataset: Path, since: float) -> None:
    """fsync what a commit wrote, and the directories naming it: Lance renames its files
    into place but does not fsync them, so without this a commit that returned could be
    lost to a power cut (a process crash loses nothing either way)."""
    dirs = set()
    for path in dataset.rglob("*"):
        if path.is_file() and path.stat().st_mtime >= since - 1:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(path.parent)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_tag(ds, tag: str, number: int) -> None:
    tags = ds.tags.list()
    if tag in tags:
        ds.tags.update(tag, number)
    else:
        ds.tags.create(tag, number)
    models = sorted((t for t in ds.tags.list() if t.startswith("model-")), key=lambda t: ds.tags.list()[t]["version"])
    for old in models[:-KEEP_MODEL_TAGS]:
        ds.tags.delete(old)


def _cleanup(root: Path, ds) -> None:
    """Drop versions beyond the kept ones and graphs no kept version names.

    Runs under the lock after the commit; a failure here costs only disk space.
    """
    try:
        ds.cleanup_old_versions(older_than=timedelta(0), retain_versions=KEEP_VERSIONS, error_if_tagged_old_versions=False)
        graphs = root / GRAPHS
        if graphs.is_dir():
            named = {r.get("graph") for v in ds.versions() if (r := _record(ds, int(v["version"]))) is not None}
            for path in graphs.iterdir():
                if path.name not in named:
                    path.unlink(missing_ok=True)
    except (OSError, RuntimeError, ValueError):
        pass


def history(root: Path) -> list[dict[str, Any]]:
    """Every kept version: number, time, operation, count, model_version, tags."""
    ds = _open_dataset(root, None)
    tags: dict[int, list[str]] = {}
    for name, info in ds.tags.list().items():
        tags.setdefault(int(info["version"]), []).append(name)
    out = []
    for v in ds.versions():
        number = int(v["version"])
        record = _record(ds, number) or {}
        out.append({"version": number, "time": v["timestamp"].isoformat(timespec="seconds"),
                    "operation": record.get("operation", "not by fedvec"), "count": record.get("count"),
                    "model_version": record.get("model_version"), "tags": sorted(tags.get(number, []))})
    return out


def disk_bytes(root: Path, version: int) -> int:
    """Bytes of the data files of one version (Lance's own count) plus its graph."""
    ds = _open_dataset(root, None)
    for v in ds.versions():
        if int(v["version"]) == version:
            size = int(v["metadata"].get("total_files_size", 0))
            record = _record(ds, version) or {}
            graph = root / GRAPHS / str(record.get("graph"))
            return size + (graph.stat().st_size if record.get("graph") and graph.is_file() else 0)
    return 0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
