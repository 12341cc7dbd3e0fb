"""The server checkpoints after every round; a run whose process is SIGKILLed mid-run
is resumed (``resume=<its dir>``, into a fresh directory) and reaches the same final
metrics as an uninterrupted run with the same seed (the plain protocol: no noise, sums
in a fixed order, so both runs see the same numbers; the uninterrupted run is the one
the fault tests share)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import CLEAN
from processes import Processes

from fed_app.checkpoint import CheckpointError, load
from fed_app.config import compose_config, load_experiment

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = CLEAN  # 8 rounds


def _run(procs: Processes, name: str, out: Path, *extra: str):
    return procs.start(name, [sys.executable, "-m", "simulations.run", *OVERRIDES, *extra, f"hydra.run.dir={out}"])


def _checkpointed_round(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_sigkilled_server_resumes_to_the_same_final_metrics(tmp_path, clean_run):
    killed_dir, resumed_dir = tmp_path / "killed", tmp_path / "resumed"
    with Processes(tmp_path / "logs", env={"PYTHONPATH": str(ROOT)}, cwd=ROOT) as procs:
        killed = _run(procs, "killed", killed_dir)
        deadline = time.monotonic() + 600
        while _checkpointed_round(killed_dir) < 2 and killed.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert killed.running(), "the run ended before it could be killed:\n" + killed.tail()
        killed.kill(signal.SIGKILL)
        at = _checkpointed_round(killed_dir)
        assert 2 <= at < 8 and not (killed_dir / "summary.json").exists()
        resumed = _run(procs, "resumed", resumed_dir, f"resume={killed_dir}")
        assert resumed.wait_exit(600) == 0, resumed.tail()
    ref = clean_run
    got = json.loads((resumed_dir / "summary.json").read_text())
    assert got["resumed_from"] == {"run_dir": str(killed_dir), "round": at}
    assert [r["round"] for r in got["rounds"]] == list(range(9))
    for key in ("recall_10_at_10", "recall_1_at_1", "recall_1_at_10"):
        assert got["final"]["federated"][key] == ref["final"]["federated"][key], key
    assert got["final"]["federated"]["distortion"] == pytest.approx(ref["final"]["federated"]["distortion"], rel=1e-6)
    for a, b in zip(got["rounds"], ref["rounds"]):  # every round, before and after the kill
        assert a["distortion"] == pytest.approx(b["distortion"], rel=1e-6), (a["round"], a, b)


def test_resume_refuses_another_experiments_checkpoint_or_a_tampered_one(tmp_path):
    from fed_app.checkpoint import save

    cfg = load_experiment(compose_config(OVERRIDES)).as_dict()
    import numpy as np

    save(tmp_path, 2, cfg, {"encoder.linear.weight": np.eye(4, dtype=np.float32)}, {}, {"strategy": {}})
    assert load(tmp_path, cfg).round == 2
    with pytest.raises(CheckpointError, match=r"another experiment \(config differs in \['num_rounds'\]\)"):
        load(tmp_path, load_experiment(compose_config([*OVERRIDES, "num_rounds=7"])).as_dict())
    (tmp_path / "checkpoint.npz").write_bytes((tmp_path / "checkpoint.npz").read_bytes()[:-3] + b"xyz")
    with pytest.raises(CheckpointError, match="does not match"):
        load(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        load(tmp_path / "nowhere", cfg)
