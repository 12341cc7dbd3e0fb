"""Vectors and their ids, read straight from the vector databases users already run.

A source is a URI naming the database, the collection (or table) and, where the
database cannot tell, which field holds the vectors or the ids::

    milvus:///data/milvus.db?collection=docs          Milvus Lite file (query_iterator)
    milvus://localhost:19530?collection=docs          a Milvus server
    qdrant:///data/qdrant?collection=docs             Qdrant local mode (scroll)
    qdrant://localhost:6333?collection=docs           a Qdrant server
    lancedb:///data/lancedb?table=docs                a LanceDB table (Lance scanner)

Optional keys: ``vector=<field>`` (when a collection has several vector fields),
``id=<field>`` (Milvus/LanceDB: an integer column other than the primary key or ``id``;
Qdrant: an integer payload key instead of the point id). Ids are kept as they are in
the source: they must be non-negative integers (faiss's ids), and a source with string
or UUID ids is refused with the field to use instead. Each database's client package is
optional; a missing one is named with the command that installs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .validation import VectorError, check_vectors

SCHEMES = {  # scheme -> (what names the collection, the packages it needs)
    "milvus": ("collection", ("pymilvus", "milvus-lite")),
    "qdrant": ("collection", ("qdrant-client",)),
    "lancedb": ("table", ("lancedb", "pylance")),
}


@dataclass(frozen=True)
class Source:
    scheme: str
    location: str  # a local path, or host:port of a server
    remote: bool
    collection: str
    vector: str | None
    id: str | None

    def __str__(self) -> str:
        return f"{self.scheme} {'server' if self.remote else 'at'} {self.location}, {SCHEMES[self.scheme][0]} {self.collection!r}"


def is_source_uri(text: str) -> bool:
    return text.split("://", 1)[0] in SCHEMES and "://" in text


def parse_uri(uri: str) -> Source:
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise VectorError(f"source {uri!r}: unknown database {parts.scheme!r}; use one of {', '.join(f'{s}://' for s in SCHEMES)}")
    name_key = SCHEMES[parts.scheme][0]
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - {name_key, "vector", "id"})
    if unknown:
        raise VectorError(f"source {uri!r}: unknown key {unknown[0]!r} (keys: {name_key}, vector, id)")
    if not query.get(name_key):
        raise VectorError(f"source {uri!r}: name the {name_key}: {parts.scheme}://...?{name_key}=<name>")
    remote = bool(parts.netloc)
    location = parts.netloc if remote else parts.path
    if not location:
        raise VectorError(f"source {uri!r}: no path (local: {parts.scheme}:///abs/path?...) or host:port (server: {parts.scheme}://host:port?...)")
    return Source(parts.scheme, location, remote, query[name_key], query.get("vector") or None, query.get("id") or None)


def _require(scheme: str) -> None:
    modules = {"pymilvus": "pymilvus", "milvus-lite": "milvus_lite", "qdrant-client": "qdrant_client", "lancedb": "lancedb", "pylance": "lance"}
    for package in SCHEMES[scheme][1]:
        try:
            import_module(modules[package])
        except ImportError:
            raise VectorError(f"{scheme}:// sources need {' and '.join(SCHEMES[scheme][1])}: pip install -e '.[connectors]' "
                              f"(or pip install {' '.join(SCHEMES[scheme][1])})") from None


def _integer_ids(values: Any, src: Source, field: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise VectorError(f"{src}: ids in {field!r} are not integers (e.g. {arr.ravel()[0]!r}); faiss ids are integers: "
                          "name an integer field with &id=<field>")
    if arr.size and arr.min() < 0:
        raise VectorError(f"{src}: ids in {field!r} include negative values ({int(arr.min())}); faiss ids must be >= 0")
    return arr.astype(np.int64)


def _pick(candidates: list[str], asked: str | None, src: Source, what: str, key: str) -> str:
    if asked is not None:
        if asked not in candidates:
            raise VectorError(f"{src}: no {what} {asked!r} (it has: {', '.join(candidates) or 'none'})")
        return asked
    if len(candidates) != 1:
        raise VectorError(f"{src}: {'no' if not candidates else 'several'} {what}s ({', '.join(candidates) or 'none'}); "
                          f"name one with &{key}=<field>")
    return candidates[0]


# -- one reader per database: batches of (ids, vectors) ----------------------------------


def _milvus(src: Source, batch_size: int) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=f"http://{src.location}" if src.remote else src.location)
    if not client.has_collection(src.collection):
        raise VectorError(f"{src}: no such collection (it has: {', '.join(client.list_collections()) or 'none'})")
    fields = client.describe_collection(src.collection)["fields"]
    floats = [f["name"] for f in fields if f["type"] == DataType.FLOAT_VECTOR]
    vector = _pick(floats, src.vector, src, "float vector field", "vector")
    if src.id is not None:
        id_field = _pick([f["name"] for f in fields if f["type"] in (DataType.INT64, DataType.INT32, DataType.INT16, DataType.INT8)],
                         src.id, src, "integer field", "id")
    else:
        primary = next(f for f in fields if f.get("is_primary"))
        if primary["type"] != DataType.INT64:
            raise VectorError(f"{src}: its primary key {primary['name']!r} is {primary['type'].name}, not INT64 "
                              "(faiss ids are integers); name an integer field with &id=<field>")
        id_field = primary["name"]
    loaded = str(client.get_load_state(src.collection).get("state", "")).endswith("Loaded")
    if not loaded:  # a reopened Milvus Lite collection is released: queries need it in memory
        client.load_collection(src.collection)
    count = int(client.query(src.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        it = client.query_iterator(src.collection, batch_size=batch_size, output_fields=[id_field, vector])
        try:
            while rows := it.next():
                yield _integer_ids([r[id_field] for r in rows], src, id_field), np.asarray([r[vector] for r in rows], dtype=np.float32)
        finally:
            it.close()
            if not loaded:  # leave the collection as it was found
                client.release_collection(src.collection)
            client.close()

    return count, batches()


def _qdrant(src: Source, batch_size: int) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    from qdrant_client import QdrantClient

    host, _, port = src.location.partition(":")
    client = QdrantClient(host=host, port=int(port or 6333)) if src.remote else QdrantClient(path=src.location)
    if not client.collection_exists(src.collection):
        names = [c.name for c in client.get_collections().collections]
        client.close()
        raise VectorError(f"{src}: no such collection (it has: {', '.join(names) or 'none'})")
    info = client.get_collection(src.collection)
    vectors = info.config.params.vectors
    named = sorted(vectors) if isinstance(vectors, dict) else []
    vector = _pick(named, src.vector, src, "named vector", "vector") if named else None
    count = int(client.count(src.collection, exact=True).count)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offset = None
        try:
            while True:
                points, offset = client.scroll(src.collection, limit=batch_size, offset=offset, with_vectors=[vector] if vector else True,
                                               with_payload=[src.id] if src.id else False)
                if points:
                    if src.id is not None:
                        missing = [p.id for p in points if src.id not in (p.payload or {})]
                        if missing:
                            raise VectorError(f"{src}: point {missing[0]} has no payload key {src.id!r}")
                        ids = _integer_ids([p.payload[src.id] for p in points], src, f"payload {src.id}")
                    else:
                        ids = _integer_ids([p.id if isinstance(p.id, int) else str(p.id) for p in points], src, "point id")
                    rows = [p.vector[vector] if vector else p.vector for p in points]
                    yield ids, np.asarray(rows, dtype=np.float32)
                if offset is None:
                    return
        finally:
            client.close()

    return count, batches()


def _lancedb(src: Source, batch_size: int) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(f"db://{src.location}" if src.remote else src.location)
    try:
        table = db.open_table(src.collection)
    except (ValueError, FileNotFoundError):
        names = list(db.list_tables().tables)  # the first page: enough to name what exists
        raise VectorError(f"{src}: no such table (it has: {', '.join(names) or 'none'})") from None
    schema = table.schema
    vecs = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type)]
    vector = _pick(vecs, src.vector, src, "float vector column", "vector")
    ints = [f.name for f in schema if pa.types.is_integer(f.type)]
    if src.id is None and "id" not in ints:
        raise VectorError(f"{src}: no integer 'id' column (faiss ids are integers); name one with &id=<column> "
                          f"(integer columns: {', '.join(ints) or 'none'})")
    id_col = _pick(ints, src.id or "id", src, "integer id column", "id")
    count = int(table.count_rows())

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for batch in table.to_lance().to_batches(columns=[id_col, vector], batch_size=batch_size):
            col = batch.column(vector)
            dim = col.type.list_size
            yield _integer_ids(batch.column(id_col).to_numpy(), src, id_col), col.values.to_numpy().astype(np.float32).reshape(len(batch), dim)

    return count, batches()


READERS = {"milvus": _milvus, "qdrant": _qdrant, "lancedb": _lancedb}


def read_source(uri: str, batch_size: int = 10_000, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(vectors float32 [n, d], ids int64 [n]) of a whole collection, in the source's order.

    ``progress``: a progress bar on stderr (None: only on a terminal).
    """
    from tqdm import tqdm

    src = parse_uri(uri)
    if batch_size < 1:
        raise VectorError(f"batch size must be >= 1, got {batch_size}")
    _require(src.scheme)
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # it logs a traceback for errors we report in one line
    try:
        count, batches = READERS[src.scheme](src, batch_size)
        xs, ids = [], []
        with tqdm(total=count, unit="vec", desc=f"import {src.scheme}", disable=None if progress is None else not progress) as bar:
            for i, x in batches:
                ids.append(i), xs.append(x)
                bar.update(len(i))
    except VectorError:
        raise
    except Exception as exc:  # the database's own error, said in one line with the source
        raise VectorError(f"{src}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if not ids:
        raise VectorError(f"{src}: the {SCHEMES[src.scheme][0]} is empty")
    x = check_vectors(np.concatenate(xs), name=f"vectors of {src}")
    return x, np.concatenate(ids)
