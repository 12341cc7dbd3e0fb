"""A writer killed with SIGKILL mid-save leaves a shard that opens to a complete version.

Lance writes data files first and the version's manifest last; a kill in between leaves
files no version names, which opening ignores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vector_index.quantizers import IndexSpec
from vector_index.store import Shard

D, BATCH = 32, 4000
ROOT = Path(__file__).resolve().parents[1]

WRITER = f"""
import sys
import numpy as np
from vector_index.store import Shard
from tests.test_store_crash import vectors_of
shard = Shard.open(sys.argv[1])
while True:
    start = int(shard.ids.max()) + 1 if len(shard) else 0
    ids = np.arange(start, start + {BATCH})
    shard.add(vectors_of(ids), ids)
    print(shard.save(), flush=True)
"""


def vectors_of(ids: np.ndarray) -> np.ndarray:
    """Vectors that are a function of their id, so a reader can check every stored row."""
    return np.sin(ids[:, None] * 0.37 + np.arange(D)[None, :] * 1.3).astype(np.float32)


def check_complete(root: Path, batch: int = BATCH) -> Shard:
    shard = Shard.open(root)  # verifies sizes + checksums against the manifest
    n = len(shard)
    assert n % batch == 0, n
    np.testing.assert_array_equal(np.sort(shard.ids), np.arange(n))
    if n:
        np.testing.assert_array_equal(shard.vectors(shard.ids), vectors_of(shard.ids))
        probe = shard.ids[:: max(1, n // 7)]
        assert (shard.search(vectors_of(probe), 1)[1][:, 0] == probe).all()
    return shard


def test_sigkill_during_saves_leaves_a_complete_version(tmp_path):
    root = tmp_path / "shard"
    Shard.create(root, D, IndexSpec("flat"))
    rng = np.random.default_rng(1)
    last_count = 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # wait for one save so the kill lands in the loop
        assert first.strip().isdigit(), proc.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        committed = [int(v) for v in [first, *out.split()] if v.strip()]
        shard = check_complete(root)
        # every save that returned is durable; a save in flight may or may not be
        assert shard.version >= committed[-1]
        assert len(shard) >= last_count + BATCH
        last_count = len(shard)
    assert last_count >= 6 * BATCH


def test_leftovers_of_an_interrupted_save_are_ignored_then_pruned(tmp_path):
    """Files of a commit that never happened (a data file, a graph) do not affect open;
    the orphan graph goes at the next save."""
    root = tmp_path / "shard"
    shard = Shard.create(root, D, IndexSpec("hnsw", hnsw_m=8))
    ids = np.arange(10)
    shard.add(vectors_of(ids), ids)
    shard.save()
    data_dir = root / "data.lance" / "data"
    stray = data_dir / "00000000000000000000000000000000.lance"
    stray.write_bytes(next(data_dir.iterdir()).read_bytes()[:50])  # half a data file
    (root / "graphs" / "deadbeef.faiss").write_bytes(b"half a graph")
    opened = check_complete(root, batch=10)
    assert len(opened) == 10 and opened.version == 2
    opened.add(vectors_of(np.arange(10, 20)), np.arange(10, 20))
    assert opened.save() == 3
    assert not (root / "graphs" / "deadbeef.faiss").exists()
    assert len(check_complete(root, batch=10)) == 20
