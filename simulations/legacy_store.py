"""fedvec's old shard write path (format 1), kept as ``benchmark_store``'s baseline only.

Not a store: nothing in fedvec uses this module, and it does only what the benchmark
times. It is a compact copy of the writer that ``vector_index.store`` had before the
move to Lance (commit 309a407: ``store.py`` and ``store_format.py``), doing the same
work per save: every file of the version written aside in ``.vNNNNNN.partial`` and
fsync'ed, ``manifest.json`` with the size and sha256 of each file written last, the
directory fsync'ed and renamed to ``vNNNNNN``, ``CURRENT`` flipped atomically
(tmp file, fsync, ``os.replace``, fsync of the shard directory), then every version
but the new one and its predecessor pruned; under the shard's flock, as before. The
old input checks are kept so both stores pay for them. Opening is
``vector_index.legacy_format.read_legacy`` (every file checked against its sha256)
with the stored ``index.faiss``, as the old ``Shard.open`` did.

A shard here is a :class:`vector_index.legacy_format.LegacyShard` (arrays, model and
the faiss index in memory).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import faiss
import numpy as np

from vector_index.legacy_format import LEGACY_FORMAT, LegacyShard, _sha256, read_legacy
from vector_index.model_checks import check_model, default_bounds
from vector_index.quantizers import IndexSpec, check_codebooks, check_transform
from vector_index.shard_dataset import ShardError, _locked
from vector_index.store import _npz_bytes, check_ids, fill, make_index
from vector_index.validation import check_vectors

Transform = tuple[np.ndarray, np.ndarray]
_VERSION_RE = re.compile(r"^\.?v(\d{6,})(\.partial)?$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> dict:
    """Write, fsync, and return size and sha256 of the bytes as written."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def create(root: Path, spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray, codebooks: dict[str, np.ndarray] | None,
           transform: Transform | None, model_version: int | None) -> LegacyShard:
    """A new shard in memory holding ``vectors`` (encoded with the model, if any); not saved yet."""
    x, ids = check_vectors(vectors), check_ids(ids, len(vectors))
    books = {} if not spec.levels else codebooks  # flat kinds are encoded from the start, as before
    if spec.levels and books is not None:
        books = check_codebooks(spec, x.shape[1], books, strict=True)
    index = make_index(spec, x.shape[1], books, transform)
    fill(index, x, ids)
    manifest = {"dim": x.shape[1], "index": spec.to_dict(), "model_version": model_version, "metadata": {}}
    return LegacyShard(Path(root), manifest, x, ids, books, transform, index)


def add(shard: LegacyShard, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Append new vectors (the old ``Shard.add``: checks, then ``add_with_ids``)."""
    x, ids = check_vectors(vectors, dim=shard.vectors.shape[1]), check_ids(ids, len(vectors))
    if np.unique(ids).size != ids.size or np.isin(ids, shard.ids).any():
        raise ShardError("duplicate or already stored ids")
    shard.index.add_with_ids(x, ids)
    shard.vectors, shard.ids = np.concatenate([shard.vectors, x]), np.concatenate([shard.ids, ids])


def reencode(shard: LegacyShard, codebooks: dict[str, np.ndarray], transform: Transform | None, model_version: int) -> None:
    """Rebuild the index from the raw vectors with a new model (the old ``Shard.reencode``)."""
    dim = shard.vectors.shape[1]
    books = check_codebooks(shard.spec, dim, codebooks, strict=True)
    tr = check_transform(*transform, dim) if transform is not None else None
    norm = float(np.linalg.norm(shard.vectors.astype(np.float64), axis=1).max(initial=0.0))
    check_model(books, tr, norm, default_bounds(), rotation=shard.spec.kind == "opqpq")
    index = make_index(shard.spec, dim, books, tr)
    fill(index, shard.vectors, shard.ids)
    shard.index, shard.codebooks, shard.transform = index, books, tr
    shard.manifest["model_version"] = int(model_version)


def save(shard: LegacyShard) -> int:
    """Commit ``shard`` as the next version of its directory; returns the version number."""
    root = shard.path
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        current = (root / "CURRENT").read_text().strip() if (root / "CURRENT").is_file() else None
        number = max((int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name))), default=0) + 1
        name = f"v{number:06d}"
        index_bytes = faiss.serialize_index(shard.index)
        arrays = _npz_bytes(shard.codebooks, shard.transform)
        files = {
            "vectors.npy": lambda f: np.save(f, shard.vectors),
            "ids.npy": lambda f: np.save(f, shard.ids),
            "codebooks.npz": lambda f: np.savez(f, **arrays),
            "index.faiss": lambda f: f.write(memoryview(index_bytes)),
        }
        t = time.time()
        manifest = {**shard.manifest, "format_version": LEGACY_FORMAT, "version": number, "encoded": shard.codebooks is not None,
                    "has_transform": shard.transform is not None, "count": int(shard.ids.size), "faiss_version": faiss.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), "created_unix": t}
        manifest.setdefault("shard_created", manifest["created"])
        manifest.pop("files", None)
        partial = root / f".{name}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        sums = {fname: _write_file(partial / fname, w) for fname, w in files.items()}
        body = json.dumps({**manifest, "files": sums}, indent=2, sort_keys=True).encode()
        _write_file(partial / "manifest.json", lambda f: f.write(body))
        _fsync_dir(partial)
        os.rename(partial, root / name)
        _fsync_dir(root)
        _write_file(root / "CURRENT.tmp", lambda f: f.write((name + "\n").encode()))
        os.replace(root / "CURRENT.tmp", root / "CURRENT")
        _fsync_dir(root)
        for p in root.iterdir():  # prune: keep the new version and the one it replaces
            if p.is_dir() and p.name not in (name, current):
                shutil.rmtree(p, ignore_errors=True)
    shard.manifest = {**manifest, "files": sums}
    return number


def open_shard(root: Path) -> LegacyShard:
    """The committed version, every file verified, its index read from ``index.faiss``."""
    shard = read_legacy(Path(root))
    if shard.index.ntotal != shard.ids.size or shard.index.d != shard.vectors.shape[1]:
        raise ShardError(f"{root}: index.faiss does not match the manifest")
    return shard


def disk_bytes(root: Path) -> int:
    """Bytes of the committed version directory."""
    vdir = Path(root) / (Path(root) / "CURRENT").read_text().strip()
    return sum(p.stat().st_size for p in vdir.iterdir() if p.is_file())
