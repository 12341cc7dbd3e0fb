"""`vector_index import` straight from the databases users run: Milvus Lite, Qdrant local
mode and LanceDB, real embedded instances with thousands of vectors. Ids are kept;
sources whose ids faiss cannot take are refused naming the field to use instead."""

from __future__ import annotations

import sys
import uuid

import numpy as np
import pytest

from vector_index.__main__ import main
from vector_index.connectors import parse_uri, read_source
from vector_index.store import Shard
from vector_index.validation import VectorError

N, D = 2500, 16


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(N, D)).astype(np.float32), rng.permutation(np.arange(10_000, 10_000 + 3 * N, 3))


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory, data) -> str:
    from pymilvus import DataType, MilvusClient

    x, ids = data
    path = str(tmp_path_factory.mktemp("milvus") / "milvus.db")
    client = MilvusClient(path)
    client.create_collection("docs", dimension=D, primary_field_name="pk", vector_field_name="embedding", id_type="int", auto_id=False)
    client.insert("docs", [{"pk": int(i), "embedding": v.tolist()} for i, v in zip(ids, x)])
    schema = client.create_schema(auto_id=False)  # a string primary key, the integer id in another field
    schema.add_field("doc", DataType.VARCHAR, is_primary=True, max_length=32)
    schema.add_field("num", DataType.INT64)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=D)
    index = client.prepare_index_params()
    index.add_index("vec", index_type="FLAT", metric_type="L2")
    client.create_collection("named", schema=schema, index_params=index)
    client.insert("named", [{"doc": f"d{i}", "num": int(i), "vec": v.tolist()} for i, v in zip(ids[:300], x[:300])])
    client.close()
    return path


@pytest.fixture(scope="module")
def qdrant_dir(tmp_path_factory, data) -> str:
    from qdrant_client import QdrantClient, models

    x, ids = data
    path = str(tmp_path_factory.mktemp("qdrant"))
    client = QdrantClient(path=path)
    client.create_collection("docs", vectors_config=models.VectorParams(size=D, distance=models.Distance.EUCLID))
    client.upsert("docs", models.Batch(ids=[int(i) for i in ids], vectors=x.tolist()))
    client.create_collection("uuids", vectors_config={"text": models.VectorParams(size=D, distance=models.Distance.EUCLID),
                                                      "image": models.VectorParams(size=4, distance=models.Distance.DOT)})
    client.upsert("uuids", models.Batch(ids=[str(uuid.UUID(int=int(i))) for i in ids[:200]],
                                        vectors={"text": x[:200].tolist(), "image": np.ones((200, 4)).tolist()},
                                        payloads=[{"org_id": int(i)} for i in ids[:200]]))
    client.close()
    return path


@pytest.fixture(scope="module")
def lance_dir(tmp_path_factory, data) -> str:
    import lancedb
    import pyarrow as pa

    x, ids = data
    path = str(tmp_path_factory.mktemp("lancedb"))
    db = lancedb.connect(path)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)
    db.create_table("docs", pa.table({"id": pa.array(ids), "vector": vec, "text": pa.array([f"t{i}" for i in ids])}))
    db.create_table("no_ids", pa.table({"key": pa.array([str(i) for i in ids]), "vector": vec}))
    db.create_table("two_vectors", pa.table({"id": pa.array(ids), "a": vec, "b": vec}))
    return path


def _same_by_id(shard: Shard, x: np.ndarray, ids: np.ndarray, n: int) -> None:
    assert len(shard) == n and set(shard.ids.tolist()) == set(ids[:n].tolist())
    np.testing.assert_array_equal(shard.vectors(ids[:n]), x[:n])


@pytest.mark.parametrize("kind", ["milvus", "qdrant", "lancedb"])
def test_import_keeps_ids_and_vectors(kind, data, milvus_db, qdrant_dir, lance_dir, tmp_path, capsys):
    x, ids = data
    uri = {"milvus": f"milvus://{milvus_db}?collection=docs", "qdrant": f"qdrant://{qdrant_dir}?collection=docs",
           "lancedb": f"lancedb://{lance_dir}?table=docs"}[kind]
    assert main(["import", uri, str(tmp_path / "shard"), "--index", "pq", "--m", "4", "--nbits", "6", "--batch-size", "700"]) == 0
    assert f"added {N} vectors" in capsys.readouterr().out
    _same_by_id(Shard.open(tmp_path / "shard"), x, ids, N)


def test_ids_from_a_named_field_when_the_primary_key_is_a_string(data, milvus_db, tmp_path, capsys):
    x, ids = data
    assert main(["import", f"milvus://{milvus_db}?collection=named", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "primary key 'doc' is VARCHAR, not INT64" in err and "&id=<field>" in err
    assert not (tmp_path / "bad").exists()  # nothing created
    got, got_ids = read_source(f"milvus://{milvus_db}?collection=named&id=num")
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got_ids[order], np.sort(ids[:300]))
    np.testing.assert_array_equal(got[order], x[:300][np.argsort(ids[:300])])


def test_qdrant_uuid_points_need_an_integer_payload_key_and_named_vectors_a_name(data, qdrant_dir):
    x, ids = data
    with pytest.raises(VectorError, match=r"several named vectors \(image, text\); name one with &vector=<field>"):
        read_source(f"qdrant://{qdrant_dir}?collection=uuids")
    with pytest.raises(VectorError, match=r"ids in 'point id' are not integers .*name an integer field with &id=<field>"):
        read_source(f"qdrant://{qdrant_dir}?collection=uuids&vector=text")
    got, got_ids = read_source(f"qdrant://{qdrant_dir}?collection=uuids&vector=text&id=org_id")
    assert sorted(got_ids.tolist()) == sorted(ids[:200].tolist())
    np.testing.assert_array_equal(got[np.argsort(got_ids)], x[:200][np.argsort(ids[:200])])


def test_lancedb_needs_integer_ids_and_one_vector_column(data, lance_dir):
    with pytest.raises(VectorError, match=r"no integer 'id' column .*&id=<column>"):
        read_source(f"lancedb://{lance_dir}?table=no_ids")
    with pytest.raises(VectorError, match=r"several float vector columns \(a, b\)"):
        read_source(f"lancedb://{lance_dir}?table=two_vectors")
    x, ids = read_source(f"lancedb://{lance_dir}?table=two_vectors&vector=b")
    assert x.shape == (N, D)
    with pytest.raises(VectorError, match=r"no such table \(it has: .*docs"):
        read_source(f"lancedb://{lance_dir}?table=missing")


@pytest.mark.parametrize(("uri", "message"), [
    ("milvus:///tmp/x.db", r"name the collection: milvus://\.\.\.\?collection=<name>"),
    ("qdrant:///tmp/x?collection=a&k=3", r"unknown key 'k' \(keys: collection, vector, id\)"),
    ("lancedb://?table=t", r"no path"),
])
def test_a_malformed_source_is_named(uri, message):
    with pytest.raises(VectorError, match=message):
        parse_uri(uri)


def test_a_missing_client_package_gives_the_install_line(monkeypatch, tmp_path, capsys, qdrant_dir):
    monkeypatch.setitem(sys.modules, "qdrant_client", None)  # as if qdrant-client were not installed
    assert main(["import", f"qdrant://{qdrant_dir}?collection=docs", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[connectors]'" in err and "qdrant-client" in err
    assert not (tmp_path / "s").exists()


def test_ids_option_is_refused_with_a_database_source(lance_dir, tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.arange(N))
    assert main(["import", f"lancedb://{lance_dir}?table=docs", str(tmp_path / "s"), "--ids", str(tmp_path / "ids.npy")]) == 2
    assert "a database source brings its own ids" in capsys.readouterr().err
