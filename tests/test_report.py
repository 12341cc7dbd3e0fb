"""simulations.report on a fabricated Hydra sweep directory (no simulation: fast)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations import report


def fake_summary(m: int, strategy: str, num_rounds: int = 3) -> dict:
    base = 0.3 + 0.05 * m + (0.02 if strategy == "fedlloyd" else 0.0)
    rounds = [
        {"round": r, "distortion": 1.0 / (m + r), "recall_10_at_10": base + 0.01 * r, "recall_1_at_1": base / 2}
        for r in range(num_rounds + 1)
    ]
    rounds[1].pop("recall_10_at_10")  # eval.every > 1: a round without recall is skipped, not plotted as 0
    return {
        "final": {
            "federated": {"recall_10_at_10": rounds[-1]["recall_10_at_10"], "recall_1_at_1": base / 2, "distortion": rounds[-1]["distortion"]},
            "centralized": {"recall_10_at_10": base + 0.05, "recall_1_at_1": base / 2 + 0.01, "distortion": 0.9 / (m + num_rounds)},
            "bytes_per_vector": m,
            "bytes_up_per_client_per_round": 1000.0 * m,
        },
        "rounds": rounds,
        "config": {"num_rounds": num_rounds, "index": {"m": m}},
        "wall_time_s": 5.5,
    }


def write_run(root: Path, name: str, overrides: list[str], summary: dict | None = None, failed: dict | None = None, timing: float | None = None) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if failed is not None:
        (d / "failed.json").write_text(json.dumps(failed))
    if timing is not None:
        (d / "timing.json").write_text(json.dumps({"status": "ok", "wall_time_s": timing}))
    return d


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    common = ["data=synthetic", "num_rounds=3"]
    i = 0
    for m in (2, 4, 8):
        for strategy in ("fedlloyd", "avg_refined"):
            write_run(root, str(i), [*common, f"index.m={m}", f"strategy={strategy}"], fake_summary(m, strategy), timing=7.25)
            i += 1
    write_run(root, str(i), [*common, "index.m=5", "strategy=fedlloyd"],
              failed={"error_type": "ConfigError", "message": "index.m: the vectors' dimension 16 is not divisible by M=5"})
    write_run(root, str(i + 1), [*common, "index.m=16", "strategy=fedlloyd"])  # killed: no summary, no failed.json
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_rows_table_and_plots(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    assert [r["run"] for r in rows] == [str(i) for i in range(8)]  # natural order, multirun.yaml ignored
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["failed", "incomplete"]
    first = rows[0]
    assert first["overrides"] == "data=synthetic num_rounds=3 index.m=2 strategy=fedlloyd"
    assert (first["index.m"], first["strategy"], first["data"]) == ("2", "fedlloyd", "synthetic")
    s = fake_summary(2, "fedlloyd")
    assert float(first["fed_recall_10_at_10"]) == s["final"]["federated"]["recall_10_at_10"]
    assert float(first["central_recall_1_at_1"]) == s["final"]["centralized"]["recall_1_at_1"]
    assert float(first["central_distortion"]) == s["final"]["centralized"]["distortion"]
    assert float(first["ratio_10r10_fed_over_central"]) == pytest.approx(
        s["final"]["federated"]["recall_10_at_10"] / s["final"]["centralized"]["recall_10_at_10"])
    assert (first["bytes_per_vector"], first["bytes_up_per_client_per_round"], first["rounds"]) == ("2", "2000.0", "3")
    assert (first["wall_time_s"], first["job_time_s"]) == ("5.5", "7.25")
    assert "index.m" in rows[6]["error"] and rows[6]["error"].startswith("ConfigError")
    assert rows[6]["fed_recall_10_at_10"] == ""

    md = (out / "report.md").read_text()
    assert md == capsys.readouterr().out  # printed too
    assert "Common overrides: `data=synthetic num_rounds=3`" in md
    assert "| run | index.m | strategy | status |" in md
    assert "| 6 | 5 | fedlloyd | failed |" in md
    assert "ConfigError: index.m: the vectors' dimension 16 is not divisible by M=5" in md
    for name in report.PLOTS:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    assert not (sweep / "report.csv").exists()  # --out respected


def test_single_run_dir_and_defaults(sweep: Path) -> None:
    rows, md = report.report(sweep / "3")  # one run: out defaults to that directory
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["_overrides"]["strategy"] == "avg_refined"
    assert (sweep / "3" / "report.csv").is_file() and (sweep / "3" / "recall_vs_bytes.png").is_file()
    assert "| run | overrides | status |" not in md  # no varying key: overrides listed as common


def test_invalid_summary_and_no_timing_file(tmp_path: Path) -> None:
    bad = fake_summary(4, "fedlloyd")
    del bad["final"]["federated"]["distortion"]
    write_run(tmp_path, "0", ["index.m=4"], bad)
    write_run(tmp_path, "1", ["index.m=8"], fake_summary(8, "fedlloyd"))  # no timing.json: mtimes
    rows = report.load_rows(tmp_path)
    assert rows[0]["status"] == "invalid" and "final.federated.distortion" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["job_time_s"] is not None and rows[1]["wall_time_s"] == 5.5


def test_empty_dir_exits_non_zero(tmp_path: Path) -> None:
    assert report.main([str(tmp_path)]) == 1
    assert report.main([str(tmp_path / "missing")]) == 2


def test_parse_overrides() -> None:
    assert report.parse_overrides(["a.b=1", "+c=x=y", "~d"]) == {"a.b": "1", "c": "x=y", "d": "~"}
