"""The on-disk format of a shard: versioned directories and an atomic CURRENT pointer.

A shard directory holds::

    CURRENT                 "v000012\\n": the one committed version (replaced atomically)
    LOCK                    flock'ed by a writer while it saves
    v000011/, v000012/      immutable versions; the previous one is kept after a flip
        manifest.json       format_version, dim, index spec, model_version, count,
                            created time, size + sha256 of every other file (written last)
        vectors.npy         raw float32 [n, d]: the source of truth, re-encoding needs it
        ids.npy             int64 [n]
        codebooks.npz       injected codebook levels ("level.<name>") and the encoder
                            ("transform.A", "transform.b"), if any
        index.faiss         faiss.write_index of the encoded index (derived, kept so that
                            opening does not rebuild an HNSW graph or re-encode)

A version is written aside as ``.v000013.partial``, every file and the directory are
fsync'ed, it is renamed to ``v000013`` and only then CURRENT is flipped. A crash at any
moment therefore leaves CURRENT naming a complete version; leftovers are pruned by the
next save. Nothing here knows about faiss indexes beyond bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .validation import VectorError

FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_PARTIAL_RE = re.compile(r"^\.v(\d{6,})\.partial$")


class ShardError(VectorError):
    """A shard directory that is missing, corrupted, or written by a newer fedvec."""


def version_name(number: int) -> str:
    return f"v{number:06d}"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_file(path: Path, write: Callable[[BinaryIO], Any]) -> dict[str, Any]:
    """Write ``path`` with ``write(f)``, fsync it, and return its size and sha256.

    The checksum is computed from the file as written, so the manifest describes exactly
    the bytes that a later open will read.
    """
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def list_versions(root: Path) -> list[int]:
    """Numbers of the committed-looking and partial version directories in ``root``."""
    out = []
    for p in root.iterdir():
        m = _VERSION_RE.match(p.name) or _PARTIAL_RE.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def write_version(root: Path, number: int, files: dict[str, Callable[[BinaryIO], Any]], manifest: dict[str, Any]) -> str:
    """Write a complete version directory aside and rename it into place; return its name.

    ``manifest`` gets the sizes and checksums of ``files`` and is written last, so a
    version directory with a manifest has all its files.
    """
    name = version_name(number)
    partial = root / f".{name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    sums = {fname: write_file(partial / fname, w) for fname, w in files.items()}
    body = json.dumps({**manifest, "files": sums}, indent=2, sort_keys=True).encode()
    write_file(partial / MANIFEST, lambda f: f.write(body))
    fsync_dir(partial)
    os.rename(partial, root / name)
    fsync_dir(root)
    return name


def write_current(root: Path, name: str) -> None:
    """Point CURRENT at ``name`` atomically: tmp file, fsync, os.replace, fsync dir."""
    tmp = root / (CURRENT + ".tmp")
    write_file(tmp, lambda f: f.write((name + "\n").encode()))
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def read_current(root: Path) -> str:
    if not root.is_dir():
        raise ShardError(f"shard directory {str(root)!r} does not exist")
    try:
        name = (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        raise ShardError(f"{str(root)!r} is not a shard directory (no {CURRENT} file); create one first") from None
    if not _VERSION_RE.match(name):
        raise ShardError(f"{root / CURRENT}: does not name a version (content {name[:40]!r})")
    return name


def read_manifest(vdir: Path) -> dict[str, Any]:
    """The manifest of a version, refused if unreadable or from a newer format."""
    try:
        manifest = json.loads((vdir / MANIFEST).read_text())
    except FileNotFoundError:
        raise ShardError(f"version {vdir.name} of {str(vdir.parent)!r} has no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{vdir / MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
        raise ShardError(f"{vdir / MANIFEST}: no integer format_version; not a fedvec shard manifest")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ShardError(
            f"{vdir / MANIFEST}: format_version {manifest['format_version']} is newer than this fedvec "
            f"supports ({FORMAT_VERSION}); upgrade fedvec to open this shard"
        )
    missing = [k for k in ("dim", "index", "count", "files") if k not in manifest]
    if missing:
        raise ShardError(f"{vdir / MANIFEST}: missing field(s) {missing}")
    return manifest


def verify_files(vdir: Path, manifest: dict[str, Any], checksums: bool = True) -> None:
    """Every file the manifest lists exists with its recorded size (and sha256)."""
    for fname, meta in manifest["files"].items():
        path = vdir / fname
        if not path.is_file():
            raise ShardError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != meta["size"]:
            raise ShardError(f"{path}: {size} bytes, manifest says {meta['size']} (truncated or replaced)")
        if checksums and sha256_file(path) != meta["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest (corrupted or replaced)")


def prune(root: Path, keep: set[str]) -> None:
    """Remove version directories not in ``keep`` and leftovers of interrupted saves.

    Runs after CURRENT was flipped, so an interruption here only leaves extra files.
    """
    for p in root.iterdir():
        if (_VERSION_RE.match(p.name) and p.name not in keep) or _PARTIAL_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
    tmp = root / (CURRENT + ".tmp")
    if tmp.exists():
        tmp.unlink()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def now() -> dict[str, Any]:
    t = time.time()
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), "created_unix": t}
