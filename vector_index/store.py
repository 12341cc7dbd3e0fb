"""A shard: one organisation's persistent local vector database on faiss.

The raw vectors and their ids are the source of truth; the faiss index is derived from
them with the *global* codebooks (and encoder) injected, so a new global model is
applied by :meth:`Shard.reencode` without re-reading the organisation's data source.

Every mutating method validates all of its input before touching anything, so a
failing call leaves the shard as it was, in memory and on disk. Changes reach disk
only through :meth:`Shard.save`, which writes a new version and flips a pointer
atomically (see ``store_format``).

A shard of a compressed kind (pq, ivfpq, hnswpq, opqpq) created before any global
model exists is *unencoded*: it keeps the raw vectors and searches them exactly
(a flat index, through the encoder if one is given) until ``reencode`` provides the
codebooks. That keeps a freshly imported shard useful and answers the same ids.

HNSW cannot remove nodes: on hnsw/hnswpq shards ``delete`` and an ``upsert`` that
replaces ids rebuild the graph from the raw vectors (O(n log n)).

A Shard object is not thread-safe. Several processes may read a shard directory;
saves are serialised by a file lock, and a save from a stale handle is refused.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import store_format as fmt
from .model_checks import ModelBounds, check_model, default_bounds
from .quantizers import IndexSpec, check_codebooks, check_transform, empty_index, with_transform
from .store_format import ShardError
from .validation import VectorError, check_vectors

Transform = tuple[np.ndarray, np.ndarray]
_FLAT = IndexSpec("flat")


# -- pure helpers ---------------------------------------------------------------------


def check_ids(ids: Any, n: int | None = None, name: str = "ids") -> np.ndarray:
    """``ids`` as int64 [n], non-negative (faiss uses -1 for "no result"), or a VectorError."""
    arr = np.asarray(ids)
    if arr.size == 0 and arr.ndim == 1:
        arr = arr.astype(np.int64)  # np.asarray([]) is float64
    if arr.dtype.kind not in "iu":
        raise VectorError(f"{name}: dtype {arr.dtype} is not an integer type; ids must be int64")
    if arr.ndim != 1:
        raise VectorError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise VectorError(f"{name}: {arr.shape[0]} ids for {n} vectors")
    if arr.size and (arr.min() < 0 or (arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max)):
        raise VectorError(f"{name}: ids must be in 0..2^63-1 (-1 means 'no result' in faiss)")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _listing(ids: np.ndarray) -> str:
    head = ", ".join(str(i) for i in ids[:10])
    return f"[{head}{', ...' if ids.size > 10 else ''}] ({ids.size} in total)"


def _check_unique(ids: np.ndarray, name: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
        raise VectorError(f"{name}: duplicate ids within one call: {_listing(uniq[counts > 1])}")


def _check_model_version(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise VectorError(f"model_version must be a non-negative int, got {v!r}")
    return int(v)


def make_index(spec: IndexSpec, dim: int, codebooks: dict[str, np.ndarray] | None, transform: Transform | None) -> faiss.Index:
    """The empty encoded index of a shard: ``spec``'s kind, or exact flat if unencoded."""
    index = empty_index(spec if codebooks is not None else _FLAT, dim, codebooks or {})
    return with_transform(index, *transform) if transform is not None else index


FILL_CHUNK = 1 << 16  # rows encoded per faiss call while filling (a progress bar step on a terminal)


def fill(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """``index`` with the vectors added under their ids; a progress bar on a terminal
    when there is more than one chunk (encoding a large shard takes a while)."""
    from tqdm import tqdm

    with tqdm(total=int(ids.size), unit="vec", desc="encode", disable=True if ids.size <= FILL_CHUNK else None) as bar:
        for start in range(0, int(ids.size), FILL_CHUNK):
            index.add_with_ids(vectors[start:start + FILL_CHUNK], ids[start:start + FILL_CHUNK])
            bar.update(min(FILL_CHUNK, int(ids.size) - start))
    return index


def _npz_bytes(codebooks: dict[str, np.ndarray] | None, transform: Transform | None) -> dict[str, np.ndarray]:
    arrays = {f"level.{k}": v for k, v in (codebooks or {}).items()}
    if transform is not None:
        arrays["transform.A"], arrays["transform.b"] = transform
    return arrays


# -- the shard ------------------------------------------------------------------------


class Shard:
    """A persistent local vector store in a directory. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], vectors: np.ndarray, ids: np.ndarray,
                 codebooks: dict[str, np.ndarray] | None, transform: Transform | None,
                 index: faiss.Index, version: int) -> None:
        self.path = path
        self.dim = int(manifest["dim"])
        self.spec = IndexSpec.from_dict(manifest["index"])
        self.model_version: int | None = manifest.get("model_version")
        self.metadata: dict[str, Any] = dict(manifest.get("metadata") or {})
        self._shard_created = manifest.get("shard_created", manifest.get("created"))
        self._vectors, self._ids = vectors, ids
        self._codebooks, self._transform = codebooks, transform
        self._index = index
        self.version = version  # the committed version this state derives from
        self._dirty = False

    # -- construction ---------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, dim: int, spec: IndexSpec, *, codebooks: dict[str, np.ndarray] | None = None,
               transform: Transform | None = None, model_version: int | None = None,
               metadata: dict[str, Any] | None = None) -> "Shard":
        """Create an empty shard in a new (or empty) directory and commit version 1.

        Without ``codebooks`` a compressed kind starts unencoded (exact search);
        ``model_version`` defaults to 0 when codebooks are given.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ShardError(f"{str(root)!r} already exists and is not an empty directory; use Shard.open")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise VectorError(f"dim must be a positive int, got {dim!r}")
        for level in spec.levels:
            spec.level_shape(level, dim)  # geometry errors now, not at the first reencode
        if not spec.levels:
            codebooks = {}
        elif codebooks is not None:
            codebooks = check_codebooks(spec, dim, codebooks, strict=True)
            model_version = 0 if model_version is None else model_version
        if model_version is not None:
            model_version = _check_model_version(model_version)
        transform = check_transform(*transform, dim) if transform is not None else None
        manifest = {"dim": int(dim), "index": spec.to_dict(), "model_version": model_version,
                    "metadata": dict(metadata or {})}
        shard = cls(root, manifest, np.zeros((0, dim), np.float32), np.zeros(0, np.int64), codebooks, transform,
                    make_index(spec, dim, codebooks, transform), 0)
        root.mkdir(parents=True, exist_ok=True)
        shard._dirty = True
        shard.save()
        return shard

    @classmethod
    def open(cls, path: str | Path, version: int | None = None, verify: bool = True) -> "Shard":
        """Open the committed version (or an older retained ``version``).

        ``verify`` checks every file's sha256 against the manifest, so a truncated or
        replaced file is reported instead of misread.
        """
        root = Path(path)
        name = fmt.read_current(root) if version is None else fmt.version_name(version)
        vdir = root / name
        if not vdir.is_dir():
            raise ShardError(f"version {name} of {str(root)!r} does not exist (kept: {fmt.list_versions(root)})")
        manifest = fmt.read_manifest(vdir)
        fmt.verify_files(vdir, manifest, checksums=verify)
        dim, count = int(manifest["dim"]), int(manifest["count"])
        try:
            vectors = np.load(vdir / "vectors.npy", allow_pickle=False)
            ids = np.load(vdir / "ids.npy", allow_pickle=False)
            with np.load(vdir / "codebooks.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise ShardError(f"{vdir}: unreadable array file ({exc})") from None
        if vectors.shape != (count, dim) or vectors.dtype != np.float32 or ids.shape != (count,) or ids.dtype != np.int64:
            raise ShardError(f"{vdir}: arrays {vectors.shape}/{ids.shape} do not match the manifest's count {count}, dim {dim}")
        codebooks = {k[6:]: v for k, v in arrays.items() if k.startswith("level.")} if manifest.get("encoded", True) else None
        transform = (arrays["transform.A"], arrays["transform.b"]) if "transform.A" in arrays else None
        try:
            index = faiss.read_index(str(vdir / "index.faiss"))
        except RuntimeError as exc:
            raise ShardError(f"{vdir / 'index.faiss'}: not a readable faiss index ({str(exc).splitlines()[0][:200]})") from None
        if index.ntotal != count or index.d != dim:
            raise ShardError(f"{vdir / 'index.faiss'}: holds {index.ntotal} vectors of dim {index.d}, manifest says {count} of dim {dim}")
        return cls(root, manifest, vectors, ids, codebooks, transform, index, int(name[1:]))

    # -- reading --------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def ids(self) -> np.ndarray:
        """The stored ids (a read-only view, in storage order)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def encoded(self) -> bool:
        """False while a compressed kind waits for its first global codebooks."""
        return self._codebooks is not None

    @property
    def model(self) -> tuple[dict[str, np.ndarray], Transform | None]:
        """(codebooks, transform) of the global model the index is encoded with (copies)."""
        if self._codebooks is None:
            raise VectorError(f"shard {str(self.path)!r} has not received a global model yet")
        books = {k: v.copy() for k, v in self._codebooks.items()}
        return books, (self._transform[0].copy(), self._transform[1].copy()) if self._transform is not None else None

    @property
    def dirty(self) -> bool:
        return self._dirty

    def vectors(self, ids: Any) -> np.ndarray:
        """The raw vectors stored under ``ids`` (unknown ids are an error)."""
        ids = check_ids(ids)
        self._require_present(ids)
        order = np.argsort(self._ids, kind="stable")
        return self._vectors[order[np.searchsorted(self._ids, ids, sorter=order)]]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances [nq, k], ids [nq, k]) as faiss returns them; -1 pads missing results."""
        q = check_vectors(queries, dim=self.dim, name="queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise VectorError(f"k must be a positive int, got {k!r}")
        return self._index.search(q, int(k))

    def range_search(self, queries: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lims, distances, ids) as faiss: results of query i are [lims[i], lims[i+1]).

        Distances are squared L2 in the encoded space; results have distance < radius.
        """
        q = check_vectors(queries, dim=self.dim, name="queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, float, np.floating, np.integer)) or not 0 < radius < np.inf:
            raise VectorError(f"radius must be a positive finite number, got {radius!r}")
        return self._index.range_search(q, float(radius))

    def stats(self) -> dict[str, Any]:
        """Counts and sizes; bytes in memory = serialized faiss index + raw arrays + codebooks."""
        index_bytes = int(faiss.serialize_index(self._index).size)
        books = _npz_bytes(self._codebooks, self._transform)
        committed = self.path / fmt.version_name(self.version)
        return {
            "count": len(self), "dim": self.dim, "kind": self.spec.kind, "encoded": self.encoded,
            "model_version": self.model_version, "version": self.version, "unsaved_changes": self._dirty,
            "bytes_on_disk": fmt.dir_bytes(committed) if committed.is_dir() else 0,
            "bytes_on_disk_all_versions": fmt.dir_bytes(self.path),
            "index_bytes": index_bytes,
            "bytes_in_memory": index_bytes + self._vectors.nbytes + self._ids.nbytes + sum(a.nbytes for a in books.values()),
        }

    # -- mutation -------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: Any = None) -> np.ndarray:
        """Add new vectors; returns their ids. ``ids=None`` numbers them after the largest id.

        An id that is already stored is an error (use :meth:`upsert` to replace).
        """
        x = check_vectors(vectors, dim=self.dim)
        if ids is None:
            start = int(self._ids.max()) + 1 if self._ids.size else 0
            ids = np.arange(start, start + x.shape[0], dtype=np.int64)
        ids = check_ids(ids, x.shape[0])
        _check_unique(ids, "ids")
        present = ids[np.isin(ids, self._ids)]
        if present.size:
            raise VectorError(f"ids already in the shard: {_listing(present)}; use upsert() to replace them")
        self._apply(np.concatenate([self._vectors, x]), np.concatenate([self._ids, ids]),
                    lambda index: index.add_with_ids(x, ids))
        return ids

    def upsert(self, vectors: np.ndarray, ids: Any) -> None:
        """Insert vectors, replacing those already stored under the same ids."""
        x = check_vectors(vectors, dim=self.dim)
        ids = check_ids(ids, x.shape[0])
        _check_unique(ids, "ids")
        keep = ~np.isin(self._ids, ids)
        replaced = self._ids[~keep]

        def update(index: faiss.Index) -> None:
            self._remove(index, replaced)
            index.add_with_ids(x, ids)

        self._apply(np.concatenate([self._vectors[keep], x]), np.concatenate([self._ids[keep], ids]),
                    update, rebuild=replaced.size > 0 and self._is_hnsw())

    def delete(self, ids: Any) -> None:
        """Remove the vectors with these ids; any unknown id is an error and nothing changes."""
        ids = np.unique(check_ids(ids))
        if ids.size == 0:
            raise VectorError("ids: nothing to delete (empty)")
        self._require_present(ids)
        keep = ~np.isin(self._ids, ids)
        self._apply(self._vectors[keep], self._ids[keep], lambda index: self._remove(index, ids), rebuild=self._is_hnsw())

    def reencode(self, codebooks: dict[str, np.ndarray], transform: Transform | None, model_version: int, bounds: ModelBounds | None = None) -> None:
        """Rebuild the encoded index from the raw vectors with a new global model.

        Changes the codes, never the ids or raw vectors. ``transform`` (A, b) is the
        shared linear encoder z = x @ A.T + b (for opqpq: the rotation), or None. A model
        outside ``bounds`` (a node's defaults if None) for this shard's vectors is refused.
        """
        books = check_codebooks(self.spec, self.dim, codebooks, strict=True)
        tr = check_transform(*transform, self.dim) if transform is not None else None
        data_norm = float(np.linalg.norm(self._vectors.astype(np.float64), axis=1).max(initial=0.0))
        check_model(books, tr, data_norm, bounds or default_bounds(), rotation=self.spec.kind == "opqpq")
        version = _check_model_version(model_version)
        index = fill(make_index(self.spec, self.dim, books, tr), self._vectors, self._ids)
        self._index, self._codebooks, self._transform, self.model_version = index, books, tr, version
        self._dirty = True

    # -- persistence ----------------------------------------------------------------

    def save(self) -> int:
        """Commit the in-memory state as a new version; returns its number.

        Refuses if another process committed since this shard was opened, rather than
        silently dropping that process's changes.
        """
        if not self._dirty:
            return self.version
        with _locked(self.path):
            current = self._committed_name()
            if current != (fmt.version_name(self.version) if self.version else None):
                raise ShardError(f"{str(self.path)!r} was saved by another writer (now {current}, opened "
                                 f"{fmt.version_name(self.version)}); reopen and reapply the changes")
            number = max(fmt.list_versions(self.path), default=0) + 1
            index_bytes = faiss.serialize_index(self._index)
            arrays = _npz_bytes(self._codebooks, self._transform)
            files = {
                "vectors.npy": lambda f: np.save(f, self._vectors),
                "ids.npy": lambda f: np.save(f, self._ids),
                "codebooks.npz": lambda f: np.savez(f, **arrays),
                "index.faiss": lambda f: f.write(memoryview(index_bytes)),
            }
            manifest = {
                "format_version": fmt.FORMAT_VERSION, "version": number, "dim": self.dim,
                "index": self.spec.to_dict(), "model_version": self.model_version, "encoded": self.encoded,
                "has_transform": self._transform is not None, "count": len(self),
                "metadata": self.metadata, "faiss_version": faiss.__version__, **fmt.now(),
            }
            manifest["shard_created"] = self._shard_created or manifest["created"]
            name = fmt.write_version(self.path, number, files, manifest)
            fmt.write_current(self.path, name)
            fmt.prune(self.path, keep={name, *([current] if current else [])})
        self.version, self._dirty = number, False
        self._shard_created = manifest["shard_created"]
        return number

    # -- internals ------------------------------------------------------------------

    def _committed_name(self) -> str | None:
        try:
            return fmt.read_current(self.path)
        except ShardError:
            return None

    def _is_hnsw(self) -> bool:
        return self.encoded and self.spec.kind in ("hnsw", "hnswpq")

    def _require_present(self, ids: np.ndarray) -> None:
        unknown = ids[~np.isin(ids, self._ids)]
        if unknown.size:
            raise VectorError(f"ids not in the shard: {_listing(unknown)}; nothing was changed")

    @staticmethod
    def _remove(index: faiss.Index, ids: np.ndarray) -> None:
        if ids.size and index.remove_ids(faiss.IDSelectorBatch(ids)) != ids.size:
            raise ShardError(f"faiss removed fewer than the {ids.size} ids requested; index rebuilt")

    def _apply(self, vectors: np.ndarray, ids: np.ndarray, update, rebuild: bool = False) -> None:
        """Swap in new arrays and bring the index along: incrementally, or by rebuilding.

        If faiss fails midway through an incremental update, the index is rebuilt from the
        old arrays so memory stays consistent, and the error propagates.
        """
        if rebuild:
            self._index = fill(make_index(self.spec, self.dim, self._codebooks, self._transform), vectors, ids)
        else:
            try:
                update(self._index)
            except Exception:
                self._index = fill(make_index(self.spec, self.dim, self._codebooks, self._transform),
                                   self._vectors, self._ids)
                raise
        self._vectors, self._ids, self._dirty = vectors, ids, True


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One writer at a time per shard directory (an advisory flock on LOCK)."""
    with open(root / "LOCK", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


__all__ = ["Shard", "ShardError", "check_ids", "make_index", "fill"]
