"""`python -m simulations.run -m ...` end to end: every combination runs in its own
directory (several run_simulation calls in one process), a failing one does not stop the
others, and simulations.report tabulates and plots the sweep."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from simulations.check_summary import problems
from simulations.report import PLOTS

REPO = Path(__file__).resolve().parent.parent
TINY = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6", "init.local_k=64", "num_clients=3", "num_rounds=2",
        "privacy=secagg"]  # the averaging baselines are refused under DP


def multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cache = f"eval.reference_cache={sweep_dir.parent / 'reference-cache'}"  # fresh per test: the first run trains
    cmd = [sys.executable, "-m", "simulations.run", "-m", *TINY, *overrides, cache, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def make_report(sweep_dir: Path) -> tuple[list[dict[str, str]], str]:
    proc = subprocess.run([sys.executable, "-m", "simulations.report", str(sweep_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(sweep_dir / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, proc.stdout


def test_sweep_runs_every_combination_and_reports_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, "strategy=fedlloyd,avg_refined")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {}
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert problems(summary, centralized=True) == [], job
        assert json.loads((sweep / job / "timing.json").read_text())["wall_time_s"] > 0
        assert not (sweep / job / "failed.json").exists()
        summaries[summary["config"]["strategy"]["name"]] = summary
    assert set(summaries) == {"fedlloyd", "avg_refined"}
    # the second run of the sweep reads the centralized reference the first one trained
    first, second = (summaries[s]["final"]["centralized"] for s in ("fedlloyd", "avg_refined"))
    assert first["source"].startswith("faiss trained") and second["source"].startswith("cache ")
    assert {k: v for k, v in first.items() if k != "source"} == {k: v for k, v in second.items() if k != "source"}
    out = proc.stdout + proc.stderr  # Hydra's job log: one progress line per finished run
    assert "[sweep 1/2] ok in" in out and "[sweep 2/2] ok in" in out, out[-3000:]

    rows, stdout = make_report(sweep)
    assert [r["strategy"] for r in rows] == ["fedlloyd", "avg_refined"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r["overrides"] == " ".join([*TINY, f"strategy={r['strategy']}", f"eval.reference_cache={tmp_path / 'reference-cache'}"])
        final = summaries[r["strategy"]]["final"]
        for side, prefix in (("federated", "fed"), ("centralized", "central")):
            for key in ("recall_10_at_10", "recall_1_at_1", "distortion"):
                assert float(r[f"{prefix}_{key}"]) == final[side][key], (r["strategy"], side, key)
        assert float(r["bytes_per_vector"]) == final["bytes_per_vector"]
        assert float(r["bytes_up_per_client_per_round"]) == final["bytes_up_per_client_per_round"]
        assert r["rounds"] == "2" and float(r["job_time_s"]) > 0
    md = (sweep / "report.md").read_text()
    assert md == stdout and "| 1 | avg_refined | ok |" in md
    for name in PLOTS:
        assert (sweep / name).stat().st_size > 10_000, name


def test_failed_combination_does_not_stop_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, "index.m=4,5")  # synthetic dim 16: M=5 is refused by validation
    assert proc.returncode == 1, proc.stderr[-3000:]  # all ran; the sweep reports the failure at the end
    assert "1 run(s) failed" in proc.stderr and "index.m" in proc.stderr
    assert problems(json.loads((sweep / "0" / "summary.json").read_text()), centralized=True) == []
    assert not (sweep / "1" / "summary.json").exists()
    failed = json.loads((sweep / "1" / "failed.json").read_text())
    assert failed["error_type"] == "ConfigError" and "index.m" in failed["message"]
    assert "index.m=5" in failed["overrides"] and "Traceback" in failed["traceback"]
    assert "RUN FAILED" in (sweep / "1" / "run.log").read_text()

    rows, stdout = make_report(sweep)
    assert [(r["index.m"], r["status"]) for r in rows] == [("4", "ok"), ("5", "failed")]
    assert rows[1]["error"].startswith("ConfigError: index.m")
    assert "| 1 | 5 | failed |" in stdout and "ConfigError: index.m" in stdout


def test_sweep_size_counts_every_combination() -> None:
    from simulations.run import sweep_size

    assert sweep_size(["strategy=fedlloyd,avg_refined", "num_clients=10,50", "seed=0", "-m"]) == 4
    assert sweep_size(["index.m=range(2,6)", "hydra.sweep.dir=x"]) == 4
    assert sweep_size([]) == 1
