"""The faults of the old hand-written shard format, each replayed on the Lance store.

Every test asserts that nothing committed is lost and that the error names the problem:
concurrent first imports (one failing), tampering followed by a re-encode, a
non-integer or older model_version, pruning while readers open, disk full, a read-only
file system, and rollback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vector_index.quantizers import IndexSpec, reference_codebooks, train_reference_index
from vector_index.store import Shard, ShardError
from vector_index.validation import VectorError

ROOT = Path(__file__).resolve().parents[1]
D = 16
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cli(*args, cwd: Path, wait: bool = True):
    cmd = [sys.executable, "-m", "vector_index", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, D)).astype(np.float32)
    np.save(tmp_path / "a.npy", x[:400])
    np.save(tmp_path / "b.npy", x[400:800])
    np.save(tmp_path / "b_ids.npy", np.arange(10_000, 10_400))
    np.save(tmp_path / "dup_ids.npy", np.zeros(400, np.int64))
    np.save(tmp_path / "q.npy", x[800:820])
    return tmp_path, x


def pq_model(x: np.ndarray, seed: int) -> tuple[dict[str, np.ndarray], None]:
    spec = IndexSpec("pq", m=4, nbits=4)
    return reference_codebooks(spec, train_reference_index(spec, x, seed, add=False))


# -- concurrent writers ------------------------------------------------------------------


def test_first_import_that_fails_never_removes_another_writers_shard(files):
    """Old format: the failed first import's cleanup deleted the shard directory,
    including what a second writer had committed. Now a failed import writes nothing."""
    tmp, x = files
    for _ in range(3):  # real concurrency: both start at once
        shutil.rmtree(tmp / "s", ignore_errors=True)
        bad = cli("import", "b.npy", "s", "--ids", "dup_ids.npy", cwd=tmp, wait=False)
        good = cli("import", "a.npy", "s", cwd=tmp, wait=False)
        out_bad, out_good = bad.communicate(timeout=120), good.communicate(timeout=120)
        assert good.returncode == 0, out_good[1]
        assert bad.returncode == 2 and "duplicate ids" in out_bad[1]
        shard = Shard.open(tmp / "s")
        np.testing.assert_array_equal(shard.vectors(np.arange(400)), x[:400])
        assert len(shard) == 400
    # and deterministically: the failing writer runs after the other one committed
    r = cli("import", "b.npy", "s", "--ids", "dup_ids.npy", cwd=tmp)
    assert r.returncode == 2 and len(Shard.open(tmp / "s")) == 400


def test_two_first_imports_both_land_or_one_is_refused_clearly(files):
    tmp, x = files
    for _ in range(3):
        shutil.rmtree(tmp / "s", ignore_errors=True)
        procs = [cli("import", "a.npy", "s", cwd=tmp, wait=False),
                 cli("import", "b.npy", "s", "--ids", "b_ids.npy", cwd=tmp, wait=False)]
        outs = [p.communicate(timeout=120) for p in procs]
        codes = [p.returncode for p in procs]
        shard = Shard.open(tmp / "s")
        if codes == [0, 0]:
            assert len(shard) == 800
        else:
            assert sorted(codes) == [0, 2], outs
            err = outs[codes.index(2)][1]
            assert "another writer" in err and "nothing was written" in err and len(err.strip().splitlines()) == 1
            assert len(shard) == 400
        landed = [i for i, c in enumerate(codes) if c == 0]
        for i in landed:  # whoever landed is there, bit for bit
            ids = np.arange(400) if i == 0 else np.arange(10_000, 10_400)
            np.testing.assert_array_equal(shard.vectors(ids), x[:400] if i == 0 else x[400:800])


def test_stale_writer_is_refused_in_process(tmp_path, files):
    _, x = files
    a = Shard.create(tmp_path / "s", D, IndexSpec("flat"), commit=False)
    b = Shard.create(tmp_path / "s", D, IndexSpec("flat"), commit=False)
    a.add(x[:100])
    b.add(x[100:200])
    a.save()
    with pytest.raises(ShardError, match="created by another writer meanwhile .* nothing was written"):
        b.save()
    np.testing.assert_array_equal(Shard.open(tmp_path / "s").vectors(np.arange(100)), x[:100])


# -- tampering ---------------------------------------------------------------------------


def test_tampered_shard_cannot_be_reencoded_and_rollback_restores_it(files):
    """Old format: an emptied checksum list let a re-encode commit zeroed vectors and
    prune the good version. Now the tampered version is refused, so nothing builds on it,
    and the good version is rolled back to."""
    import lance

    tmp, x = files
    books, _ = pq_model(x[:400], 0)
    np.savez(tmp / "model.npz", pq=books["pq"], model_version=5)
    assert cli("import", "a.npy", "s", "--index", "pq", "--m", "4", "--nbits", "4", "--codebooks", "model.npz", cwd=tmp).returncode == 0
    good = Shard.open(tmp / "s")
    hits = good.search(x[800:820], 5)
    lance.dataset(str(tmp / "s" / "data.lance")).update({"vector": "vector"}, where="id < 50")  # another program writes
    np.savez(tmp / "model2.npz", pq=pq_model(x[:400], 1)[0]["pq"], model_version=6)
    r = cli("reencode", "s", "model2.npz", cwd=tmp)
    assert r.returncode == 2 and "not committed by fedvec" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("rollback", "s", "--version", str(good.version), cwd=tmp)
    assert r.returncode == 0, r.stderr
    back = Shard.open(tmp / "s")
    assert back.model_version == 5 and back.version == good.version + 2
    np.testing.assert_array_equal(back.vectors(np.arange(400)), x[:400])
    for a, b in zip(back.search(x[800:820], 5), hits):
        np.testing.assert_array_equal(a, b)
    assert back.history()[-1]["operation"] == f"rollback to {good.version}"


def test_rollback_by_model_tag_keeps_later_versions(files):
    tmp, x = files
    shard = Shard.create(tmp / "s", D, IndexSpec("pq", m=4, nbits=4), codebooks=pq_model(x[:400], 0)[0], model_version=3, commit=False)
    shard.add(x[:400])
    v1 = shard.save()
    before = shard.search(x[800:820], 5)
    shard.reencode(pq_model(x[:400], 1)[0], None, 9)
    shard.delete(np.arange(10))
    v2 = shard.save()
    shard = Shard.restore(tmp / "s", "model-3")
    v3 = shard.version
    assert (v1, v2, v3) == (1, 2, 3) and shard.model_version == 3 and len(shard) == 400
    for a, b in zip(Shard.open(tmp / "s").search(x[800:820], 5), before):
        np.testing.assert_array_equal(a, b)
    assert len(Shard.open(tmp / "s", version=v2)) == 390  # what came after is kept
    tags = {h["version"]: h["tags"] for h in shard.history()}
    assert tags[v1] == ["model-3"] and tags[v2] == ["model-9"]
    with pytest.raises(ShardError, match="cannot open version 17"):
        Shard.restore(tmp / "s", 17)


# -- model_version -----------------------------------------------------------------------


def test_model_version_is_an_integer_that_only_grows(files):
    """Old format: model_version 3.7 after 4 was stored as 3."""
    tmp, x = files
    books = pq_model(x[:400], 0)[0]
    np.savez(tmp / "m4.npz", pq=books["pq"], model_version=4)
    np.savez(tmp / "m37.npz", pq=books["pq"], model_version=3.7)
    np.savez(tmp / "m3.npz", pq=books["pq"], model_version=3)
    assert cli("import", "a.npy", "s", "--index", "pq", "--m", "4", "--nbits", "4", "--codebooks", "m4.npz", cwd=tmp).returncode == 0
    r = cli("reencode", "s", "m37.npz", cwd=tmp)
    assert r.returncode == 2 and "model_version" in r.stderr and "must be one integer" in r.stderr
    r = cli("reencode", "s", "m3.npz", cwd=tmp)
    assert r.returncode == 2 and "model_version 3 is older than the shard's model 4" in r.stderr
    r = cli("reencode", "s", "m4.npz", "--model-version", "4", cwd=tmp)  # the same model again is fine
    assert r.returncode == 0, r.stderr
    shard = Shard.open(tmp / "s")
    assert shard.model_version == 4 and isinstance(shard.model_version, int)
    with pytest.raises(VectorError, match="non-negative int, got 5.0"):
        shard.reencode(books, None, 5.0)


# -- pruning while reading ---------------------------------------------------------------

WRITER = """
import sys, numpy as np
from vector_index.store import Shard
shard = Shard.open(sys.argv[1])
rng = np.random.default_rng(0)
for i in range(int(sys.argv[2])):
    shard.add(rng.normal(size=(50, 16)).astype(np.float32))
    if i % 3 == 2:
        shard.delete(shard.ids[:20])
    shard.save()  # prunes versions beyond the kept ones, and graphs no kept version names
print("done", shard.version, flush=True)
"""


@pytest.mark.parametrize("kind", ["hnsw", "pq"])
def test_readers_never_fail_while_a_writer_prunes(tmp_path, files, kind):
    """Old format: a prune concurrent with a reader's open gave a transient error."""
    _, x = files
    books = pq_model(x[:400], 0)[0] if kind == "pq" else None
    shard = Shard.create(tmp_path / "s", D, IndexSpec(kind, m=4, nbits=4, hnsw_m=8), codebooks=books, commit=False)
    shard.add(x[:400])
    shard.save()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "s"), "60"], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opened, errors = 0, []
    try:
        while writer.poll() is None:
            try:
                s = Shard.open(tmp_path / "s")
                assert len(s) >= 400 and s.search(x[800:803], 3)[1].shape == (3, 3)
                opened += 1
            except ShardError as exc:
                errors.append(str(exc))
    finally:
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0 and out.startswith("done"), err
    assert not errors, errors[:3]
    assert opened >= 5
    assert len(Shard.open(tmp_path / "s").history()) <= 9  # pruned meanwhile


# -- disk full, read-only ----------------------------------------------------------------

FULL_DISK = r"""
set -e
mount -t tmpfs -o size=600k tmpfs "$1"
cd "$1"
python -m vector_index import "$2/a.npy" s --index pq --m 4 --nbits 4 --train-local >/dev/null
python -m vector_index search s "$2/q.npy" -k 5 --out "$2/before.npz" >/dev/null
python -m vector_index info s > "$2/info_before.json"
python -c "import numpy as np; np.save('$2/big.npy', np.random.default_rng(1).normal(size=(20000, 16)).astype(np.float32))"
set +e
python -m vector_index import "$2/big.npy" s 2> "$2/full.err"; echo $? > "$2/full.rc"
python -m vector_index search s "$2/q.npy" -k 5 --out "$2/after_full.npz" >/dev/null
python -m vector_index info s > "$2/info_after.json"
mount -o remount,ro "$1"
python -m vector_index delete s --ids 1 2 3 2> "$2/ro.err"; echo $? > "$2/ro.rc"
python -m vector_index search s "$2/q.npy" -k 5 --out "$2/after_ro.npz" >/dev/null; echo $? > "$2/search_ro.rc"
"""


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs (user namespaces)")
def test_disk_full_and_read_only_leave_the_previous_version_and_one_clear_line(files):
    tmp, _ = files
    mnt = tmp / "mnt"
    mnt.mkdir()
    (tmp / "full.sh").write_text(FULL_DISK)
    r = subprocess.run(["unshare", "-rm", "bash", str(tmp / "full.sh"), str(mnt), str(tmp)], cwd=ROOT,
                       env={**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    err = (tmp / "full.err").read_text().strip()
    assert (tmp / "full.rc").read_text().strip() == "2"
    assert len(err.splitlines()) == 1 and "could not commit" in err and "No space left" in err
    assert "still holds version 1" in err, err
    before, after = json.loads((tmp / "info_before.json").read_text()), json.loads((tmp / "info_after.json").read_text())
    assert before["shard"] == after["shard"] and before["versions"] == after["versions"]
    ro = (tmp / "ro.err").read_text().strip()
    assert (tmp / "ro.rc").read_text().strip() == "2" and len(ro.splitlines()) == 1
    assert "Read-only file system" in ro and "still holds version 1" in ro, ro
    assert (tmp / "search_ro.rc").read_text().strip() == "0"
    with np.load(tmp / "before.npz") as a, np.load(tmp / "after_full.npz") as b, np.load(tmp / "after_ro.npz") as c:
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_array_equal(a["ids"], c["ids"])


def test_an_add_writes_only_the_new_rows(tmp_path, files):
    """A save after adds is a Lance append: earlier data files are not rewritten."""
    _, x = files
    shard = Shard.create(tmp_path / "s", D, IndexSpec("flat"), commit=False)
    shard.add(x[:400])
    shard.save()
    for i in range(5):
        shard.add(x[400 + 10 * i:410 + 10 * i])
        shard.save()
    import lance

    ds = lance.dataset(str(tmp_path / "s" / "data.lance"))
    rows = [f.count_rows() for f in ds.get_fragments()]
    assert rows == [400, 10, 10, 10, 10, 10]  # appends added fragments, nothing was rewritten
