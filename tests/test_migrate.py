"""`vector_index migrate` converts fedvec's old directory format into a Lance shard.

The fixtures in tests/data/legacy_v1 were written by the old store itself (commit
309a407): a pq shard with a rotation, model_version 7 and user metadata, and an hnsw shard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from vector_index.__main__ import main
from vector_index.legacy_format import read_legacy
from vector_index.store import Shard, ShardError

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_v1"


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def legacy(tmp_path):
    shutil.copytree(LEGACY, tmp_path / "old")
    return tmp_path / "old"


def test_pq_shard_migrates_with_its_model_and_answers_like_its_stored_index(legacy, tmp_path, capsys):
    before = tree(legacy)
    assert main(["migrate", str(legacy / "pq"), str(tmp_path / "new")]) == 0
    assert "migrated" in capsys.readouterr().out
    old = read_legacy(legacy / "pq")
    new = Shard.open(tmp_path / "new")
    assert len(new) == 395 and new.model_version == 7 and new.spec == old.spec
    assert new.metadata["source"] == "fixture" and "v000003" in new.metadata["migrated_from"]
    np.testing.assert_array_equal(new.vectors(old.ids), old.vectors)
    books, transform = new.model
    np.testing.assert_array_equal(books["pq"], old.codebooks["pq"])
    np.testing.assert_array_equal(transform[0], old.transform[0])
    q = np.load(legacy / "queries.npy")
    d_new, i_new = new.search(q, 10)
    d_old, i_old = old.index.search(q, 10)
    np.testing.assert_array_equal(i_new, i_old)
    np.testing.assert_allclose(d_new, d_old, rtol=1e-6)
    assert [h["tags"] for h in new.history()] == [["model-7"]]
    assert tree(legacy) == before  # the old shard is left as it was


def test_hnsw_shard_migrates_and_its_graph_is_rebuilt(legacy, tmp_path):
    assert main(["migrate", str(legacy / "hnsw"), str(tmp_path / "new")]) == 0
    old, new = read_legacy(legacy / "hnsw"), Shard.open(tmp_path / "new")
    np.testing.assert_array_equal(new.vectors(old.ids), old.vectors)
    exact = faiss.IndexIDMap(faiss.IndexFlatL2(16))
    exact.add_with_ids(old.vectors, old.ids)
    q = np.load(legacy / "queries.npy")
    hits = new.search(q, 10)[1]
    truth = exact.search(q, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits, truth)]) >= 0.95


def test_opening_an_old_shard_says_how_to_migrate(legacy, capsys):
    with pytest.raises(ShardError, match="old directory format; convert it with `python -m vector_index migrate"):
        Shard.open(legacy / "pq")


def test_a_legacy_manifest_without_checksums_is_refused_and_nothing_written(legacy, tmp_path, capsys):
    manifest = legacy / "pq" / "v000003" / "manifest.json"
    body = json.loads(manifest.read_text())
    body["files"] = {}
    manifest.write_text(json.dumps(body))
    assert main(["migrate", str(legacy / "pq"), str(tmp_path / "new")]) == 2
    assert "lists no checksum" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_changed_legacy_file_is_refused(legacy, tmp_path, capsys):
    vectors = legacy / "pq" / "v000003" / "vectors.npy"
    raw = bytearray(vectors.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"
    vectors.write_bytes(bytes(raw))
    assert main(["migrate", str(legacy / "pq"), str(tmp_path / "new")]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
