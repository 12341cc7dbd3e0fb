"""A shard: one organisation's persistent local vector database: data on Lance, search on faiss.

The raw vectors and their ids are the source of truth; the faiss index is derived from
them with the *global* codebooks (and encoder) injected, so a new global model is
applied by :meth:`Shard.reencode` without re-reading the organisation's data source.

Every mutating method validates all of its input before touching anything, so a
failing call leaves the shard as it was, in memory and on disk. Changes reach disk
only through :meth:`Shard.save`, which commits one new Lance version (see
``shard_dataset``). For pq, ivfpq and opqpq the stored faiss codes are loaded into the
index as they are, never re-encoded; hnsw graphs are stored beside their version.

A shard of a compressed kind (pq, ivfpq, hnswpq, opqpq) created before any global
model exists is *unencoded*: it keeps the raw vectors and searches them exactly
(a flat index, through the encoder if one is given) until ``reencode`` provides the
codebooks. That keeps a freshly imported shard useful and answers the same ids.

HNSW cannot remove nodes: on hnsw/hnswpq shards ``delete`` and an ``upsert`` that
replaces ids rebuild the graph from the raw vectors (O(n log n)).

A Shard object is not thread-safe. Several processes may read a shard directory;
saves are serialised by a file lock, and a save from a stale handle is refused.
``model_version`` is a non-negative integer that a re-encode may not lower; only an
explicit :meth:`Shard.rollback` returns to an older model, together with its codes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import shard_dataset as data
from .model_checks import ModelBounds, check_model, default_bounds
from .quantizers import CODE_KINDS, IndexSpec, add_codes, check_codebooks, check_transform, empty_index, sa_codes, with_transform
from .shard_dataset import ShardError, Snapshot
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


def _check_model_version(v: Any, current: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise VectorError(f"model_version must be a non-negative int, got {v!r}")
    if current is not None and v < current:
        raise VectorError(f"model_version {v} is older than the shard's model {current}; model versions only grow "
                          "(to return to an older model, roll back to the version that holds it)")
    return int(v)


def make_index(spec: IndexSpec, dim: int, codebooks: dict[str, np.ndarray] | None, transform: Transform | None) -> faiss.Index:
    """The empty encoded index of a shard: ``spec``'s kind, or exact flat if unencoded."""
    index = empty_index(spec if codebooks is not None else _FLAT, dim, codebooks or {})
    return with_transform(index, *transform) if transform is not None else index


FILL_CHUNK = 1 << 16  # rows encoded per faiss call while filling (a progress bar step on a terminal)


def fill(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, codes: bool = False) -> np.ndarray | None:
    """Add the vectors to ``index`` under their ids; with ``codes`` return the faiss codes it
    stored (encoded once, kept by the store). A progress bar on a terminal when there is
    more than one chunk (encoding a large shard takes a while)."""
    from tqdm import tqdm

    out = []
    with tqdm(total=int(ids.size), unit="vec", desc="encode", disable=True if ids.size <= FILL_CHUNK else None) as bar:
        for start in range(0, int(ids.size), FILL_CHUNK):
            x, i = vectors[start:start + FILL_CHUNK], ids[start:start + FILL_CHUNK]
            if codes:
                out.append(sa_codes(index, x))
                add_codes(index, out[-1], i)
            else:
                index.add_with_ids(x, i)
            bar.update(i.size)
    if not codes:
        return None
    return np.concatenate(out) if out else np.zeros((0, index_code_size(index)), np.uint8)


def index_code_size(index: faiss.Index) -> int:
    return int(sa_codes(index, np.zeros((1, index.d), np.float32)).shape[1])


def _npz_bytes(codebooks: dict[str, np.ndarray] | None, transform: Transform | None) -> dict[str, np.ndarray]:
    arrays = {f"level.{k}": v for k, v in (codebooks or {}).items()}
    if transform is not None:
        arrays["transform.A"], arrays["transform.b"] = transform
    return arrays


# -- the shard ------------------------------------------------------------------------


class Shard:
    """A persistent local vector store in a directory. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, snap: Snapshot, version: int) -> None:
        header = snap.header
        self.path = path
        self.dim = int(header["dim"])
        self.spec = IndexSpec.from_dict(header["index"])
        self.model_version: int | None = header.get("model_version")
        self.metadata: dict[str, Any] = dict(header.get("metadata") or {})
        self._shard_created = header.get("shard_created")
        self._vectors, self._ids, self._codes = snap.vectors, snap.ids, snap.codes
        encoded = header.get("encoded", True)
        self._codebooks = {k[6:]: v for k, v in snap.model.items() if k.startswith("level.")} if encoded else None
        self._transform = (snap.model["transform.A"], snap.model["transform.b"]) if "transform.A" in snap.model else None
        self._index = self._load_index(snap.graph)
        self.version = version  # the committed version this state derives from (0: not committed yet)
        self._committed_header = self._header() if version else None
        self._appended_from: int | None = len(self) if version else None  # rows committed, while only adds follow
        self._dirty = not version
        self._operation: str | None = None  # what save() records, when more than an add or update

    # -- construction ---------------------------------------------------------------

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` holds a shard (committed at least once)."""
        return data.is_shard(Path(path))

    @staticmethod
    def latest_version(path: str | Path) -> int | None:
        """The newest committed version on disk (None: no shard), without reading any data."""
        return data.latest(Path(path))

    @staticmethod
    def version_stamp(path: str | Path) -> frozenset[str]:
        """Changes whenever a version is committed (or pruned): a cheap "anything new?" check."""
        return data.stamp(Path(path))

    @classmethod
    def create(cls, path: str | Path, dim: int, spec: IndexSpec, *, codebooks: dict[str, np.ndarray] | None = None,
               transform: Transform | None = None, model_version: int | None = None,
               metadata: dict[str, Any] | None = None, commit: bool = True) -> "Shard":
        """Create an empty shard in a new (or empty) directory; commit version 1 unless ``commit=False``.

        With ``commit=False`` nothing is written until :meth:`save`, so a first import that
        fails leaves nothing behind and never removes anything. Without ``codebooks`` a
        compressed kind starts unencoded (exact search); ``model_version`` defaults to 0
        when codebooks are given.
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
        header = {"format": data.FORMAT, "dim": int(dim), "index": spec.to_dict(), "model_version": model_version,
                  "encoded": codebooks is not None, "metadata": dict(metadata or {}), "shard_created": _now()}
        encoded_codes = codebooks is not None and spec.kind in CODE_KINDS
        codes = np.zeros((0, 0), np.uint8) if encoded_codes else None
        shard = cls(root, Snapshot(header, _npz_bytes(codebooks, transform), np.zeros(0, np.int64),
                                   np.zeros((0, dim), np.float32), codes), 0)
        if encoded_codes:
            shard._codes = np.zeros((0, index_code_size(shard._index)), np.uint8)
        if commit:
            shard.save()
        return shard

    @classmethod
    def open(cls, path: str | Path, version: int | str | None = None, verify: bool = True) -> "Shard":
        """Open the latest version, or an older kept one (a number or a tag such as ``model-7``).

        ``verify`` recomputes the version's sha256 over ids, vectors, codes and model and
        compares it with the record its commit wrote; a mismatch is refused.
        """
        number, snap, _ = data.read(Path(path), version, verify)
        shard = cls(Path(path), snap, number)
        if version is not None:  # an old version: saving it would overwrite what came after
            shard._appended_from = None
        return shard

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
        return self._dirty or (self._committed_header is not None and self._header() != self._committed_header)

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

    def history(self) -> list[dict[str, Any]]:
        """The kept versions of this shard on disk (number, time, operation, count, model_version, tags)."""
        return data.history(self.path)

    def stats(self) -> dict[str, Any]:
        """Counts and sizes; bytes in memory = serialized faiss index + raw arrays + codes + codebooks."""
        index_bytes = int(faiss.serialize_index(self._index).size)
        books = _npz_bytes(self._codebooks, self._transform)
        codes = self._codes.nbytes if self._codes is not None else 0
        return {
            "count": len(self), "dim": self.dim, "kind": self.spec.kind, "encoded": self.encoded,
            "model_version": self.model_version, "version": self.version, "unsaved_changes": self.dirty,
            "bytes_on_disk": data.disk_bytes(self.path, self.version) if self.version else 0,
            "bytes_on_disk_all_versions": data.dir_bytes(self.path) if self.path.is_dir() else 0,
            "index_bytes": index_bytes,
            "bytes_in_memory": index_bytes + self._vectors.nbytes + self._ids.nbytes + codes + sum(a.nbytes for a in books.values()),
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
        keep = np.ones(len(self), bool)
        self._apply(keep, x, ids)
        return ids

    def upsert(self, vectors: np.ndarray, ids: Any) -> None:
        """Insert vectors, replacing those already stored under the same ids."""
        x = check_vectors(vectors, dim=self.dim)
        ids = check_ids(ids, x.shape[0])
        _check_unique(ids, "ids")
        self._apply(~np.isin(self._ids, ids), x, ids)

    def delete(self, ids: Any) -> None:
        """Remove the vectors with these ids; any unknown id is an error and nothing changes."""
        ids = np.unique(check_ids(ids))
        if ids.size == 0:
            raise VectorError("ids: nothing to delete (empty)")
        self._require_present(ids)
        self._apply(~np.isin(self._ids, ids), np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64))

    def reencode(self, codebooks: dict[str, np.ndarray], transform: Transform | None, model_version: int, bounds: ModelBounds | None = None) -> None:
        """Rebuild the encoded index from the raw vectors with a new global model.

        Changes the codes, never the ids or raw vectors. ``transform`` (A, b) is the
        shared linear encoder z = x @ A.T + b (for opqpq: the rotation), or None. A model
        outside ``bounds`` (a node's defaults if None) for this shard's vectors is refused,
        and so is a ``model_version`` below the current one.
        """
        books = check_codebooks(self.spec, self.dim, codebooks, strict=True)
        tr = check_transform(*transform, self.dim) if transform is not None else None
        data_norm = float(np.linalg.norm(self._vectors.astype(np.float64), axis=1).max(initial=0.0))
        check_model(books, tr, data_norm, bounds or default_bounds(), rotation=self.spec.kind == "opqpq")
        version = _check_model_version(model_version, self.model_version)
        index = make_index(self.spec, self.dim, books, tr)
        codes = fill(index, self._vectors, self._ids, codes=self.spec.kind in CODE_KINDS)
        self._index, self._codes, self._codebooks, self._transform, self.model_version = index, codes, books, tr, version
        self._appended_from, self._dirty, self._operation = None, True, "reencode"

    @classmethod
    def restore(cls, path: str | Path, version: int | str) -> "Shard":
        """Commit an older kept version (a number or a tag) as the newest one and return it.

        Nothing after it is lost: those versions stay listed (until pruned). Works when the
        latest version is refused as tampered, which is what it is for.
        """
        root = Path(path)
        number, snap, _ = data.read(root, version, verify=True)
        shard = cls(root, snap, number)
        shard.version = data.latest(root) or number  # the commit goes after whatever is newest
        shard._appended_from, shard._dirty, shard._operation = None, True, f"rollback to {number}"
        shard.save()
        return shard

    # -- persistence ----------------------------------------------------------------

    def save(self) -> int:
        """Commit the in-memory state as a new version; returns its number.

        Refuses if another process committed since this shard was opened, rather than
        silently dropping that process's changes; a failed commit changes nothing on disk.
        """
        if not self.dirty:
            return self.version
        header = self._header()
        appended_from = self._appended_from if header == self._committed_header else None
        graph = bytes(faiss.serialize_index(self._index)) if self._is_hnsw() else None
        snap = Snapshot(header, _npz_bytes(self._codebooks, self._transform), self._ids, self._vectors, self._codes, graph)
        if not self.version:
            operation = "create"
        else:
            operation = self._operation or ("add" if appended_from is not None else "update")
        installs_model = self._operation == "reencode" or (not self.version and self.encoded and bool(self.spec.levels))
        tag = f"model-{self.model_version}" if installs_model else None
        number = data.commit(self.path, snap, self.version, appended_from, operation, tag)
        self.version, self._dirty, self._committed_header = number, False, header
        self._appended_from, self._operation = len(self), None
        return number

    # -- internals ------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {"format": data.FORMAT, "dim": self.dim, "index": self.spec.to_dict(), "model_version": self.model_version,
                "encoded": self.encoded, "metadata": self.metadata, "shard_created": self._shard_created}

    def _is_hnsw(self) -> bool:
        return self.encoded and self.spec.kind in ("hnsw", "hnswpq")

    def _load_index(self, graph: bytes | None) -> faiss.Index:
        """The search index of a loaded version: its graph, its codes, or its raw vectors."""
        if self._is_hnsw() and (graph is not None or len(self)):
            if graph is None:
                raise ShardError(f"{self.path}: an {self.spec.kind} shard version without its faiss graph")
            index = faiss.deserialize_index(np.frombuffer(graph, dtype=np.uint8))
            if index.ntotal != len(self) or index.d != self.dim:
                raise ShardError(f"{self.path}: its faiss graph holds {index.ntotal} vectors of dim {index.d}, "
                                 f"the data {len(self)} of dim {self.dim}")
            return index
        index = make_index(self.spec, self.dim, self._codebooks, self._transform)
        if self._codes is not None and self.encoded and self.spec.kind in CODE_KINDS:
            if self._codes.shape[0] != len(self) or (len(self) and self._codes.shape[1] != index_code_size(index)):
                raise ShardError(f"{self.path}: stored codes {self._codes.shape} do not fit {self.spec.kind} of this model")
            if len(self):
                add_codes(index, self._codes, self._ids)
        else:
            fill(index, self._vectors, self._ids)
        return index

    def _require_present(self, ids: np.ndarray) -> None:
        unknown = ids[~np.isin(ids, self._ids)]
        if unknown.size:
            raise VectorError(f"ids not in the shard: {_listing(unknown)}; nothing was changed")

    def _apply(self, keep: np.ndarray, x: np.ndarray, ids: np.ndarray) -> None:
        """Keep the rows ``keep`` and append (x, ids); bring the index along.

        Removal from an HNSW graph is a rebuild. If faiss fails midway, the index is rebuilt
        from the old arrays so memory stays consistent, and the error propagates.
        """
        removed = self._ids[~keep]
        with_codes = self.encoded and self.spec.kind in CODE_KINDS
        vectors, all_ids = np.concatenate([self._vectors[keep], x]), np.concatenate([self._ids[keep], ids])
        try:
            if removed.size and self._is_hnsw():
                index = make_index(self.spec, self.dim, self._codebooks, self._transform)
                codes = fill(index, vectors, all_ids)
            else:
                index = self._index
                if removed.size and index.remove_ids(faiss.IDSelectorBatch(removed)) != removed.size:
                    raise ShardError(f"faiss removed fewer than the {removed.size} ids requested; index rebuilt")
                new = fill(index, x, ids, codes=with_codes) if ids.size else None
                codes = np.concatenate([self._codes[keep], new]) if with_codes and new is not None else (
                    self._codes[keep] if with_codes else None)
        except Exception:
            self._index = self._load_index(None) if not self._is_hnsw() else self._rebuilt()
            raise
        if removed.size:
            self._appended_from = None
        self._index, self._vectors, self._ids, self._codes, self._dirty = index, vectors, all_ids, codes, True

    def _rebuilt(self) -> faiss.Index:
        index = make_index(self.spec, self.dim, self._codebooks, self._transform)
        fill(index, self._vectors, self._ids)
        return index


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["Shard", "ShardError", "check_ids", "make_index", "fill"]
