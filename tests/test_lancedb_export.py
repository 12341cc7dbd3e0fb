"""`vector_index export-lancedb`: the federated codebook inside a LanceDB table, nothing
retrained. Queried the documented way, LanceDB's top-k equals the faiss shard's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vector_index.__main__ import main
from vector_index.quantizers import IndexSpec, reference_codebooks, train_reference_index
from vector_index.store import Shard

N, D, NQ = 4000, 16, 100


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(D, D))
    return (rng.normal(size=(N, D)) @ mix).astype(np.float32), (rng.normal(size=(NQ, D)) @ mix).astype(np.float32), rng.permutation(N) * 5 + 11


def encoded_shard(path, data, spec: IndexSpec, rotate: bool) -> Shard:
    x, _, ids = data
    rng = np.random.default_rng(1)
    a = np.linalg.qr(rng.normal(size=(D, D)))[0].astype(np.float32) if rotate else np.eye(D, dtype=np.float32)
    b = np.zeros(D, np.float32)
    books, _ = reference_codebooks(spec, train_reference_index(spec, x @ a.T, 0))
    shard = Shard.create(path, D, spec)
    shard.add(x, ids)
    shard.reencode(books, (a, b), model_version=42)
    shard.save()
    return shard


def lancedb_topk(dest, table: str, queries: np.ndarray, k: int) -> np.ndarray:
    """The module docstring's recipe, as a LanceDB user would run it."""
    import lancedb

    tbl = lancedb.connect(str(dest)).open_table(table)
    meta = tbl.schema.metadata
    column = meta[b"fedvec.vector_column"].decode()
    tr = json.loads(meta.get(b"fedvec.transform", b"null"))
    q = queries if tr is None else queries @ np.asarray(tr["A"]).T + np.asarray(tr["b"])
    nprobe = int(meta[b"fedvec.nprobe"])
    hits = [tbl.search(q[i].astype(np.float32), vector_column_name=column).nprobes(nprobe).limit(k).select(["id", "_distance"]).to_arrow()
            for i in range(len(q))]
    return np.stack([h.column("_distance").to_numpy() for h in hits]), np.stack([h.column("id").to_numpy() for h in hits])


@pytest.mark.parametrize(("spec", "rotate"), [
    (IndexSpec("pq", m=4, nbits=8), True),
    (IndexSpec("opqpq", m=4, nbits=8), True),
    (IndexSpec("ivfpq", m=4, nbits=8, nlist=16, nprobe=4), False),
    (IndexSpec("pq", m=4, nbits=4), False),
], ids=["pq-rotated", "opqpq", "ivfpq", "pq-4bits"])
def test_lancedb_topk_equals_the_faiss_shard(tmp_path, data, spec, rotate, capsys):
    _, queries, _ = data
    shard = encoded_shard(tmp_path / "shard", data, spec, rotate)
    dest = tmp_path / "lancedb"
    assert main(["export-lancedb", str(tmp_path / "shard"), str(dest), "--table", "docs"]) == 0
    out = capsys.readouterr().out
    assert "IVF_PQ on 'encoded'" in out if rotate else "IVF_PQ on 'vector'" in out
    assert "model version 42" in out
    faiss_d, faiss_ids = shard.search(queries, 10)
    lance_d, lance_ids = lancedb_topk(dest, "docs", queries, 10)
    # the same codes give the same k best distances for every query (squared L2 on both sides)
    np.testing.assert_allclose(np.sort(lance_d, axis=1), faiss_d, rtol=1e-4, atol=1e-3)
    same = np.mean([set(g) == set(f) for g, f in zip(lance_ids, faiss_ids)])
    assert same >= 0.95, same  # the same ids, up to ties at the k-th distance (16 centroids make ties common)


def test_export_refuses_raw_kinds_unencoded_shards_and_an_existing_table(tmp_path, data, capsys):
    x, _, ids = data
    flat = Shard.create(tmp_path / "flat", D, IndexSpec("flat"))
    flat.add(x, ids)
    flat.save()
    assert main(["export-lancedb", str(tmp_path / "flat"), str(tmp_path / "db")]) == 2
    assert "stores raw vectors, there is no federated codebook to export" in capsys.readouterr().err
    raw = Shard.create(tmp_path / "raw", D, IndexSpec("pq", m=4, nbits=8))
    raw.add(x, ids)
    raw.save()
    assert main(["export-lancedb", str(tmp_path / "raw"), str(tmp_path / "db")]) == 2
    assert "has not received a global model yet" in capsys.readouterr().err
    encoded_shard(tmp_path / "s", data, IndexSpec("pq", m=4, nbits=8), False)
    assert main(["export-lancedb", str(tmp_path / "s"), str(tmp_path / "db")]) == 0
    assert main(["export-lancedb", str(tmp_path / "s"), str(tmp_path / "db")]) == 2
    assert "table 's' exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export-lancedb", str(tmp_path / "s"), str(tmp_path / "db"), "--overwrite"]) == 0
