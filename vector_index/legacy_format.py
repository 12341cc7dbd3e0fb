"""Reading fedvec's first, hand-written shard format (format 1), to migrate it to Lance.

A format-1 shard directory holds ``CURRENT`` naming a version directory ``v000012/``
with ``manifest.json`` (dim, index spec, model_version, count, size + sha256 of every
file), ``vectors.npy``, ``ids.npy``, ``codebooks.npz`` and ``index.faiss``. Nothing
here writes that format any more; :func:`migrate` reads it, verified, into a new shard.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .quantizers import IndexSpec
from .shard_dataset import ShardError, is_legacy

LEGACY_FORMAT = 1
_VERSION_RE = re.compile(r"^v(\d{6,})$")


@dataclass
class LegacyShard:
    path: Path
    manifest: dict[str, Any]
    vectors: np.ndarray
    ids: np.ndarray
    codebooks: dict[str, np.ndarray] | None
    transform: tuple[np.ndarray, np.ndarray] | None
    index: faiss.Index  # the stored faiss index, for checking the migration

    @property
    def spec(self) -> IndexSpec:
        return IndexSpec.from_dict(self.manifest["index"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_legacy(root: Path) -> LegacyShard:
    """The committed version of a format-1 shard; every file checked against the manifest.

    A manifest whose ``files`` mapping lacks a file is refused: the checksums are the
    only evidence the arrays are the ones that were committed.
    """
    if not root.is_dir():
        raise ShardError(f"shard directory {str(root)!r} does not exist")
    if not is_legacy(root):
        raise ShardError(f"{str(root)!r} is not a shard in the old directory format (no CURRENT file)")
    name = (root / "CURRENT").read_text().strip()
    vdir = root / name
    if not _VERSION_RE.match(name) or not vdir.is_dir():
        raise ShardError(f"{root / 'CURRENT'}: does not name a kept version (content {name[:40]!r})")
    try:
        manifest = json.loads((vdir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{vdir / 'manifest.json'}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != LEGACY_FORMAT:
        raise ShardError(f"{vdir / 'manifest.json'}: not a format-1 fedvec manifest")
    files = manifest.get("files") or {}
    needed = ("vectors.npy", "ids.npy", "codebooks.npz", "index.faiss")
    unlisted = [f for f in needed if f not in files]
    if unlisted:
        raise ShardError(f"{vdir / 'manifest.json'}: lists no checksum for {unlisted}; refusing to trust those files")
    for fname in needed:
        path = vdir / fname
        if not path.is_file() or path.stat().st_size != files[fname].get("size") or _sha256(path) != files[fname].get("sha256"):
            raise ShardError(f"{path}: missing, truncated or changed since it was committed (sha256 differs)")
    try:
        vectors = np.load(vdir / "vectors.npy", allow_pickle=False)
        ids = np.load(vdir / "ids.npy", allow_pickle=False)
        with np.load(vdir / "codebooks.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        index = faiss.read_index(str(vdir / "index.faiss"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ShardError(f"{vdir}: unreadable file ({' '.join(str(exc).split())[:200]})") from None
    codebooks = {k[6:]: v for k, v in arrays.items() if k.startswith("level.")} if manifest.get("encoded", True) else None
    transform = (arrays["transform.A"], arrays["transform.b"]) if "transform.A" in arrays else None
    return LegacyShard(root, manifest, vectors, ids, codebooks, transform, index)


def migrate(old: Path, new: Path, check_queries: int = 200):
    """Copy a format-1 shard into a new Lance shard; returns it.

    Ids, raw vectors, model and model_version carry over. For every kind but the hnsw
    ones (whose graph is rebuilt), the new index must answer ``check_queries`` of the
    stored vectors exactly as the old ``index.faiss`` did, or nothing is written.
    """
    from .store import Shard

    legacy = read_legacy(old)
    m = legacy.manifest
    metadata = {**(m.get("metadata") or {}), "migrated_from": f"{old.resolve()} ({(old / 'CURRENT').read_text().strip()})"}
    shard = Shard.create(new, int(m["dim"]), legacy.spec, codebooks=legacy.codebooks, transform=legacy.transform,
                         model_version=m.get("model_version"), metadata=metadata, commit=False)
    if legacy.ids.size:
        shard.add(legacy.vectors, legacy.ids)
    if legacy.ids.size and not legacy.spec.kind.startswith("hnsw"):
        q = legacy.vectors[:: max(1, legacy.ids.size // check_queries)][:check_queries]
        k = min(10, int(legacy.ids.size))
        if not np.array_equal(shard.search(q, k)[1], legacy.index.search(q, k)[1]):
            raise ShardError(f"{old}: the migrated index does not answer like the stored index.faiss; nothing was written")
    shard.save()
    return shard
