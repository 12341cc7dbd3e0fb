"""Shard: results equal plain faiss over the same vectors; bad input changes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from vector_index.quantizers import IndexSpec, KINDS, reference_codebooks, train_reference_index
from vector_index.store import Shard, ShardError
from vector_index.validation import VectorError

D = 16
SPECS = {kind: IndexSpec(kind, m=4, nbits=6, nlist=16, nprobe=4, hnsw_m=8, ef_search=32) for kind in KINDS}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, D))
    x = (centres[rng.integers(20, size=2100)] + 0.3 * rng.normal(size=(2100, D))).astype(np.float32)
    ids = rng.permutation(10**6)[:2000].astype(np.int64)
    return x[:2000], ids, x[2000:]


@pytest.fixture(scope="module")
def references(data):
    """Per kind: a centrally trained faiss index and its codebooks (+ OPQ rotation)."""
    x, _, _ = data
    out = {}
    for kind, spec in SPECS.items():
        ref = train_reference_index(spec, x, seed=0)
        out[kind] = (ref, *reference_codebooks(spec, ref))
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def pq_idmap(books: dict[str, np.ndarray]) -> faiss.Index:
    """The plain-faiss counterpart of a pq shard, built without vector_index."""
    m, k, dsub = books["pq"].shape
    inner = faiss.IndexPQ(m * dsub, m, int(np.log2(k)))
    faiss.copy_array_to_vector(books["pq"].ravel(), inner.pq.centroids)
    inner.pq.sync_transposed_centroids()
    inner.is_trained = True
    index = faiss.IndexIDMap(inner)
    return index


def apply_same_ops(shard: Shard, index: faiss.Index, x: np.ndarray, ids: np.ndarray) -> None:
    """add, add, delete, upsert (replacing and new ids) on a shard and a faiss index alike."""
    shard.add(x[:1200], ids[:1200])
    index.add_with_ids(x[:1200], ids[:1200])
    shard.add(x[1200:1800], ids[1200:1800])
    index.add_with_ids(x[1200:1800], ids[1200:1800])
    gone = ids[100:300]
    shard.delete(gone)
    index.remove_ids(faiss.IDSelectorBatch(gone))
    up_ids = np.concatenate([ids[500:550], ids[1800:1850]])  # 50 replaced, 50 new
    up_x = np.concatenate([x[500:550] + 0.05, x[1800:1850]])
    shard.upsert(up_x, up_ids)
    index.remove_ids(faiss.IDSelectorBatch(ids[500:550]))
    index.add_with_ids(up_x, up_ids)


def assert_same_search(shard: Shard, index: faiss.Index, q: np.ndarray, k: int = 10) -> None:
    d1, i1 = shard.search(q, k)
    d2, i2 = index.search(q, k)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)


def test_flat_add_delete_upsert_equal_faiss_idmap(tmp_path, data):
    x, ids, q = data
    shard = Shard.create(tmp_path / "s", D, SPECS["flat"])
    ref = faiss.IndexIDMap(faiss.IndexFlatL2(D))
    apply_same_ops(shard, ref, x, ids)
    assert len(shard) == ref.ntotal == 1800 - 200 + 50
    assert_same_search(shard, ref, q)
    exact = ((q[:, None, :] - shard.vectors(shard.ids)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.sort(shard.ids[np.argsort(exact, axis=1)[:, :5]], axis=1),
                                  np.sort(shard.search(q, 5)[1], axis=1))


def test_pq_equals_faiss_idmap_pq_with_same_codebook(tmp_path, data, references):
    x, ids, q = data
    _, books, _ = references["pq"]
    shard = Shard.create(tmp_path / "s", D, SPECS["pq"], codebooks=books, model_version=7)
    ref = pq_idmap(books)
    apply_same_ops(shard, ref, x, ids)
    assert_same_search(shard, ref, q)
    assert shard.model_version == 7


def test_range_search_equals_brute_force(tmp_path, data):
    x, ids, q = data
    shard = Shard.create(tmp_path / "s", D, SPECS["flat"])
    shard.add(x, ids)
    dist = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    radius = float(np.quantile(dist, 0.02))
    lims, d, found = shard.range_search(q, radius)
    assert lims.shape == (q.shape[0] + 1,)
    for i in range(q.shape[0]):
        got = set(found[lims[i]:lims[i + 1]].tolist())
        sure = set(ids[dist[i] < radius - 1e-3].tolist())
        maybe = set(ids[dist[i] < radius + 1e-3].tolist())
        assert sure <= got <= maybe
        assert (d[lims[i]:lims[i + 1]] < radius).all()


def test_reencode_changes_codes_not_ids(tmp_path, data, references):
    x, ids, q = data
    _, books, _ = references["pq"]
    shard = Shard.create(tmp_path / "s", D, SPECS["pq"], codebooks=books, model_version=1)
    shard.add(x, ids)
    codes_before = faiss.vector_to_array(faiss.downcast_index(shard._index.index).codes).copy()
    ids_before = shard.ids.copy()
    new_books = {"pq": books["pq"][:, ::-1].copy() * 1.1}  # same shape, different centroids
    shard.reencode(new_books, None, model_version=2)
    codes_after = faiss.vector_to_array(faiss.downcast_index(shard._index.index).codes)
    assert codes_before.shape == codes_after.shape and (codes_before != codes_after).any()
    np.testing.assert_array_equal(shard.ids, ids_before)
    assert shard.model_version == 2
    ref = pq_idmap(new_books)
    ref.add_with_ids(x, ids)
    assert_same_search(shard, ref, q)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_equals_trained_faiss_and_survives_reload(tmp_path, data, references, kind):
    """Injected central codebooks in a shard answer like the trained faiss index itself."""
    x, ids, q = data
    ref, books, transform = references[kind]
    shard = Shard.create(tmp_path / "s", D, SPECS[kind], codebooks=books, transform=transform, model_version=3)
    shard.add(x, ids)
    d1, i1 = shard.search(q, 10)
    d2, i2 = ref.search(q, 10)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)
    assert np.mean(i1 == ids[i2]) >= 0.9, kind  # vectors with equal codes tie; ids order ties
    shard.save()
    again = Shard.open(tmp_path / "s")
    d3, i3 = again.search(q, 10)
    np.testing.assert_allclose(d1, d3, rtol=1e-5, atol=1e-5)  # faiss may take another float path
    assert np.mean(i1 == i3) >= 0.99, kind
    assert len(again) == len(x) and again.model_version == 3 and again.encoded
    stats = again.stats()
    assert stats["count"] == len(x) and stats["bytes_on_disk"] > x.nbytes and stats["bytes_in_memory"] > x.nbytes


@pytest.mark.parametrize("kind", ["hnsw", "hnswpq", "ivfpq", "opqpq"])
def test_delete_and_upsert_on_every_index_type(tmp_path, data, references, kind):
    x, ids, q = data
    _, books, transform = references[kind]
    shard = Shard.create(tmp_path / "s", D, SPECS[kind], codebooks=books, transform=transform)
    shard.add(x, ids)
    shard.delete(ids[:100])
    shard.upsert(x[100:110] + 1.0, ids[100:110])
    assert len(shard) == 1900
    found = shard.search(q, 50)[1]
    assert not np.isin(found, ids[:100]).any()
    assert set(shard.ids.tolist()) == set(ids[100:].tolist())
    np.testing.assert_array_equal(shard.vectors(ids[100:110]), x[100:110] + 1.0)


def test_unencoded_compressed_shard_searches_exactly(tmp_path, data):
    """Before a global model exists a pq shard stores raw vectors and answers exactly."""
    x, ids, q = data
    shard = Shard.create(tmp_path / "s", D, SPECS["pq"])
    assert not shard.encoded and shard.model_version is None
    shard.add(x, ids)
    ref = faiss.IndexIDMap(faiss.IndexFlatL2(D))
    ref.add_with_ids(x, ids)
    assert_same_search(shard, ref, q)
    shard.save()
    assert not Shard.open(tmp_path / "s").encoded


def test_empty_shard_and_auto_ids(tmp_path, data):
    x, _, q = data
    shard = Shard.create(tmp_path / "s", D, SPECS["hnsw"])
    assert (shard.search(q, 3)[1] == -1).all()
    np.testing.assert_array_equal(shard.add(x[:5]), np.arange(5))
    np.testing.assert_array_equal(shard.add(x[5:7]), [5, 6])


# -- bad input: a clear error and nothing changed, in memory or on disk ----------------


@pytest.fixture
def saved(tmp_path, data, references):
    x, ids, q = data
    _, books, _ = references["pq"]
    shard = Shard.create(tmp_path / "s", D, SPECS["pq"], codebooks=books, model_version=1)
    shard.add(x[:500], ids[:500])
    shard.save()
    return shard


BAD_CALLS = {
    "wrong dimension": (lambda s, x, ids: s.add(x[:3, :8], ids[1000:1003]), "dimension 8 does not match expected 16"),
    "NaN": (lambda s, x, ids: s.add(np.where(np.arange(16) == 3, np.nan, x[:4]), ids[1000:1004]), "NaN"),
    "duplicate ids in one add": (lambda s, x, ids: s.add(x[:2], [ids[1000], ids[1000]]), "duplicate ids"),
    "id already present": (lambda s, x, ids: s.add(x[:2], ids[:2]), "use upsert"),
    "float ids": (lambda s, x, ids: s.add(x[:2], np.array([1.0, 2.0])), "not an integer type"),
    "negative ids": (lambda s, x, ids: s.add(x[:2], np.array([-1, 2])), "ids must be in 0..2^63-1"),
    "delete unknown ids": (lambda s, x, ids: s.delete([ids[0], 10**7 + 5]), str(10**7 + 5)),
    "delete nothing": (lambda s, x, ids: s.delete([]), "nothing to delete"),
    "upsert NaN": (lambda s, x, ids: s.upsert(x[:2] * np.nan, ids[:2]), "NaN"),
    "reencode wrong shape": (lambda s, x, ids: s.reencode({"pq": np.zeros((2, 64, 8), np.float32)}, None, 2), "does not match"),
    "reencode missing level": (lambda s, x, ids: s.reencode({}, None, 2), "needs codebook level"),
    "reencode bad transform": (lambda s, x, ids: s.reencode(s._codebooks, (np.eye(8), np.zeros(8)), 2), "expected A"),
    "reencode singular encoder": (lambda s, x, ids: s.reencode(s._codebooks, (np.diag(np.r_[np.ones(15), 0.0]), np.zeros(16)), 2),
                                  "encoder: singular values span"),
    "reencode 1e38 codebook": (lambda s, x, ids: s.reencode({k: np.where(np.arange(v.shape[-1]) == 0, np.float32(1e38), v) for k, v in s._codebooks.items()}, None, 2),
                               "exceeds"),
    "search wrong dimension": (lambda s, x, ids: s.search(x[:2, :4], 3), "dimension 4"),
    "search k=0": (lambda s, x, ids: s.search(x[:2], 0), "k must be"),
    "range radius NaN": (lambda s, x, ids: s.range_search(x[:2], float("nan")), "radius"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_and_changes_nothing(saved, data, case):
    x, ids, q = data
    call, message = BAD_CALLS[case]
    before_disk = tree_hashes(saved.path)
    before = (len(saved), saved.ids.copy(), saved.search(q, 5), saved.model_version)
    with pytest.raises(VectorError, match=message.replace("^", r"\^").replace(".", r"\.")):
        call(saved, x, ids)
    assert not saved.dirty
    after = (len(saved), saved.ids, saved.search(q, 5), saved.model_version)
    assert before[0] == after[0] and before[3] == after[3]
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[2][1], after[2][1])
    saved.save()
    assert tree_hashes(saved.path) == before_disk


def _open_fails_and_leaves_disk(root: Path, message: str) -> None:
    before = tree_hashes(root)
    with pytest.raises(ShardError, match=message):
        Shard.open(root)
    assert tree_hashes(root) == before


def _data_files(root: Path) -> list[Path]:
    return sorted((root / "data.lance" / "data").glob("*.lance"), key=lambda p: p.stat().st_mtime)


def test_flipped_bytes_in_a_data_file_are_detected(saved):
    """A changed vector in Lance's data file fails the version's sha256, or Lance's own decoding."""
    path = _data_files(saved.path)[-1]
    raw = bytearray(path.read_bytes())
    raw[200:204] = bytes(b ^ 0x5A for b in raw[200:204])
    path.write_bytes(bytes(raw))
    _open_fails_and_leaves_disk(saved.path, "integrity record|unreadable")


def test_truncated_data_file_is_detected(saved):
    path = _data_files(saved.path)[-1]
    path.write_bytes(path.read_bytes()[:-100])
    _open_fails_and_leaves_disk(saved.path, "unreadable|integrity record")


def test_a_version_written_by_another_program_is_refused_and_the_last_good_one_kept(saved, data):
    """Lance lets any program commit; a version without fedvec's record is not read (the
    old format's emptied-manifest bypass), and the previous version still opens."""
    import lance

    good = saved.version
    ds = lance.dataset(str(saved.path / "data.lance"))
    ds.update({"id": "id + 1"})
    _open_fails_and_leaves_disk(saved.path, "not committed by fedvec")
    old = Shard.open(saved.path, version=good)
    assert len(old) == 500 and old.model_version == 1


def test_newer_format_is_refused(saved):
    from vector_index import shard_dataset

    number, snap, _ = shard_dataset.read(saved.path)
    snap.header["format"] = 99
    shard_dataset.commit(saved.path, snap, number, None, "update")
    _open_fails_and_leaves_disk(saved.path, "format 99 is newer")


def test_not_a_shard_and_existing_directory(tmp_path, saved):
    with pytest.raises(ShardError, match="does not exist"):
        Shard.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ShardError, match="not a shard directory"):
        Shard.open(tmp_path / "plain")
    with pytest.raises(ShardError, match="already exists"):
        Shard.create(saved.path, D, SPECS["flat"])
    with pytest.raises(VectorError, match="not divisible"):
        Shard.create(tmp_path / "bad", 15, SPECS["pq"])


def test_versions_are_kept_listed_and_pruned(saved, data):
    from vector_index.shard_dataset import KEEP_VERSIONS

    x, ids, _ = data
    first = saved.version
    saved.add(x[500:600], ids[500:600])
    second = saved.save()
    saved.delete(ids[:10])
    third = saved.save()
    assert first < second < third
    assert len(Shard.open(saved.path, version=second)) == 600
    assert len(Shard.open(saved.path)) == 590
    history = {h["version"]: h for h in saved.history()}
    assert [history[v]["operation"] for v in (1, first, second, third)] == ["create", "add", "add", "update"]
    assert [history[v]["count"] for v in (1, first, second, third)] == [0, 500, 600, 590]
    assert history[1]["tags"] == ["model-1"]  # the version that installed model 1
    for i in range(KEEP_VERSIONS + 2):
        saved.add(x[600 + i:601 + i], ids[600 + i:601 + i])
        saved.save()
    kept = [h["version"] for h in saved.history()]
    assert 1 in kept and first not in kept  # tagged model versions survive pruning
    assert len(kept) == KEEP_VERSIONS + 1
    assert len(Shard.open(saved.path, version="model-1")) == 0


def test_concurrent_writer_is_refused(saved, data):
    x, ids, _ = data
    other = Shard.open(saved.path)
    other.add(x[500:510], ids[500:510])
    other.save()
    saved.add(x[600:610], ids[600:610])
    with pytest.raises(ShardError, match="another writer"):
        saved.save()
    assert len(Shard.open(saved.path)) == 510
