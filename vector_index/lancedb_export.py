"""The federated codebook inside a LanceDB table: a shard's vectors with an IVF_PQ index
built from the shard's global codebooks, nothing retrained.

Lance's ``create_index(..., ivf_centroids=, pq_codebook=)`` takes injected centroids; a
flat PQ is IVF_PQ with one partition at the origin. Lance has no linear transform, so
where the shared encoder is not the identity the table carries the encoded vectors in
their own column (``encoded``), the one that is indexed, and queries must be encoded the
same way first: the transform travels in the table's schema metadata. Lance's L2
distances and codes then match the faiss shard's (same squared L2, same residual
convention for IVF-PQ).

A LanceDB user queries it as::

    import json, lancedb, numpy as np
    tbl = lancedb.connect(DEST).open_table(TABLE)
    meta = tbl.schema.metadata
    column = meta[b"fedvec.vector_column"].decode()
    tr = json.loads(meta.get(b"fedvec.transform", b"null"))
    q = query if tr is None else query @ np.asarray(tr["A"]).T + np.asarray(tr["b"])
    hits = tbl.search(q, vector_column_name=column).nprobes(int(meta[b"fedvec.nprobe"])).limit(10).to_pandas()
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .store import Shard
from .validation import VectorError

EXPORTABLE = ("pq", "opqpq", "ivfpq", "hnswpq")


def _fixed_size(x: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel()), x.shape[1])


def export_lancedb(shard: Shard, dest: str | Path, table: str, overwrite: bool = False) -> dict[str, Any]:
    """Write ``shard`` as LanceDB table ``table`` in database ``dest``; returns what was written."""
    try:
        import lancedb
        import pyarrow as pa
    except ImportError:
        raise VectorError("export-lancedb needs lancedb and pylance: pip install -e '.[connectors]' (or pip install lancedb pylance)") from None
    kind = shard.spec.kind
    if kind not in EXPORTABLE:
        raise VectorError(f"shard {str(shard.path)!r} is a {kind} index: it stores raw vectors, there is no federated codebook to export "
                          f"(export-lancedb takes {', '.join(EXPORTABLE)})")
    if not shard.encoded:
        raise VectorError(f"shard {str(shard.path)!r} has not received a global model yet; train the federation (or reencode) first")
    books, transform = shard.model
    ids = np.array(shard.ids)
    x = shard.vectors(ids)
    identity = transform is None or (np.array_equal(transform[0], np.eye(shard.dim, dtype=transform[0].dtype)) and not np.any(transform[1]))
    columns: dict[str, Any] = {"id": pa.array(ids, type=pa.int64()), "vector": _fixed_size(x)}
    column = "vector"
    if not identity:
        a, b = transform  # type: ignore[misc]
        columns["encoded"] = _fixed_size(x.astype(np.float64) @ a.T.astype(np.float64) + b)
        column = "encoded"
    nprobe = shard.spec.nprobe if kind == "ivfpq" else 1
    meta = {
        "fedvec.vector_column": column, "fedvec.nprobe": str(nprobe), "fedvec.index": json.dumps(shard.spec.to_dict()),
        "fedvec.model_version": str(shard.model_version), "fedvec.shard": str(shard.path), "fedvec.shard_version": str(shard.version),
    }
    if not identity:
        meta["fedvec.transform"] = json.dumps({"A": transform[0].tolist(), "b": transform[1].tolist()})  # type: ignore[index]
    data = pa.table(columns).replace_schema_metadata(meta)
    db = lancedb.connect(str(dest))
    try:
        db.open_table(table)
        exists = True
    except (ValueError, FileNotFoundError):
        exists = False
    if exists and not overwrite:
        raise VectorError(f"{dest}: table {table!r} exists; pass --overwrite to replace it")
    tbl = db.create_table(table, data, mode="overwrite" if exists else "create")
    coarse = books["coarse"].reshape(-1, shard.dim) if "coarse" in books else np.zeros((1, shard.dim), np.float32)
    pq = books["pq"]
    try:
        tbl.to_lance().create_index(column, "IVF_PQ", metric="L2", ivf_centroids=coarse.astype(np.float32), pq_codebook=pq.astype(np.float32),
                                    num_sub_vectors=pq.shape[0], num_bits=shard.spec.nbits, replace=True)
    except Exception as exc:  # e.g. nbits Lance does not support (it takes 4 and 8)
        db.drop_table(table)
        raise VectorError(f"{dest}: Lance refused the index (PQ{pq.shape[0]}x{shard.spec.nbits}, {coarse.shape[0]} partition(s)): "
                          f"{' '.join(str(exc).split())[:300]}") from None
    return {"table": table, "rows": int(ids.size), "vector_column": column, "partitions": int(coarse.shape[0]),
            "sub_vectors": int(pq.shape[0]), "nbits": shard.spec.nbits, "nprobe": nprobe, "model_version": shard.model_version}
