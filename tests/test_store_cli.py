"""``python -m vector_index`` as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from vector_index.vector_files import read_ids, read_vectors, write_fvecs

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vector_index", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    np.save(tmp_path / "base.npy", x[:400])
    write_fvecs(tmp_path / "more.fvecs", x[400:500])
    np.save(tmp_path / "more_ids.npy", np.arange(1000, 1100))
    np.save(tmp_path / "queries.npy", x[500:505])
    return tmp_path, x


def test_import_npy_and_fvecs_then_info_and_search(files):
    tmp, x = files
    r = cli("import", "base.npy", "shard", "--index", "flat", cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert "added 400 vectors (ids 0..399)" in r.stdout
    r = cli("import", "more.fvecs", "shard", "--ids", "more_ids.npy", cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert "500 vectors" in r.stdout

    r = cli("info", "shard", cwd=tmp)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["shard"]["count"] == info["stats"]["count"] == 500
    assert info["shard"]["index"]["kind"] == "flat"
    assert [(v["version"], v["operation"], v["count"]) for v in info["versions"]] == [(1, "create", 400), (2, "add", 500)]
    assert info["stats"]["bytes_on_disk"] > 500 * 16 * 4

    r = cli("search", "shard", "queries.npy", "-k", "5", "--out", "hits.npz", cwd=tmp)
    assert r.returncode == 0, r.stderr
    exact = faiss.IndexIDMap(faiss.IndexFlatL2(16))
    exact.add_with_ids(x[:500], np.concatenate([np.arange(400), np.arange(1000, 1100)]))
    dist, ids = exact.search(x[500:505], 5)
    with np.load(tmp / "hits.npz") as hits:
        np.testing.assert_array_equal(hits["ids"], ids)
        np.testing.assert_allclose(hits["distances"], dist, rtol=1e-5)
    lines = [ln for ln in r.stdout.splitlines() if "\t" in ln]
    assert len(lines) == 5 and lines[0].startswith("0\t") and lines[0].split("\t")[1].split()[0].startswith(f"{ids[0, 0]}:")


def test_compressed_shard_with_local_training_and_delete(files):
    tmp, x = files
    r = cli("import", "base.npy", "pq", "--index", "pq", "--m", "4", "--nbits", "4", "--train-local", cwd=tmp)
    assert r.returncode == 0, r.stderr
    info = json.loads(cli("info", "pq", cwd=tmp).stdout)
    assert info["shard"]["encoded"] and info["shard"]["index"]["m"] == 4
    r = cli("delete", "pq", "--ids", "3", "4", cwd=tmp)
    assert r.returncode == 0 and "398 left" in r.stdout, r.stderr
    r = cli("delete", "pq", "--ids", "3", cwd=tmp)
    assert r.returncode == 2 and "ids not in the shard: [3]" in r.stderr


def test_errors_are_one_line_and_exit_2(files):
    tmp, _ = files
    r = cli("search", "no-such-shard", "queries.npy", cwd=tmp)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: shard directory 'no-such-shard' does not exist"
    r = cli("import", "missing.npy", "s", cwd=tmp)
    assert r.returncode == 2 and "missing.npy' does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp / "bad.fvecs").write_bytes(b"\x10\x00\x00\x00" + b"\x00" * 10)
    r = cli("import", "bad.fvecs", "s", cwd=tmp)
    assert r.returncode == 2 and "not a valid .fvecs file" in r.stderr
    np.save(tmp / "dup_ids.npy", np.zeros(400, dtype=np.int64))
    r = cli("import", "base.npy", "s", "--ids", "dup_ids.npy", cwd=tmp)
    assert r.returncode == 2 and "duplicate ids" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp / "s").exists()  # a failed first import leaves nothing behind


def test_vector_files_roundtrip(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_fvecs(tmp_path / "a.fvecs", x)
    np.testing.assert_array_equal(read_vectors(tmp_path / "a.fvecs"), x)
    np.array([[1, 7], [1, 9]], dtype="<i4").tofile(tmp_path / "ids.ivecs")
    np.testing.assert_array_equal(read_ids(tmp_path / "ids.ivecs"), [7, 9])


@pytest.mark.parametrize("fault, message", [
    ("singular", "encoder: singular values span [0, 1], outside [0.01, 100]"),
    ("huge", "codebook level 'pq': a centroid of norm 1e+38 exceeds"),
])
def test_reencode_refuses_a_singular_encoder_or_a_1e38_codebook_and_keeps_the_shard(files, fault, message):
    tmp, x = files
    assert cli("import", "base.npy", "shard", "--index", "pq", "--m", "4", "--nbits", "4", "--train-local", cwd=tmp).returncode == 0
    before = json.loads(cli("info", "shard", cwd=tmp).stdout)
    hits_before = cli("search", "shard", "queries.npy", "-k", "5", cwd=tmp).stdout
    book = np.random.default_rng(1).normal(size=(4, 16, 4)).astype(np.float32)
    a = np.eye(16, dtype=np.float32)
    if fault == "singular":
        a[5] = 0.0
    else:
        book[2, 7, 0] = 1e38
    np.savez(tmp / "model.npz", pq=book, A=a, b=np.zeros(16, np.float32), model_version=5)
    r = cli("reencode", "shard", "model.npz", cwd=tmp)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    after = json.loads(cli("info", "shard", cwd=tmp).stdout)
    assert after["shard"] == before["shard"] and after["versions"] == before["versions"]  # nothing committed
    assert cli("search", "shard", "queries.npy", "-k", "5", cwd=tmp).stdout == hits_before
