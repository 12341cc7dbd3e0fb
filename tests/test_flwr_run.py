"""`flwr run .` the Flower way: a real local SuperLink (simulation runtime) started by
the CLI, Hydra overrides passed through --run-config, summary.json at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SUPERLINK_PORT = 39091  # the local SuperLink's fixed HTTP port in Flower 1.42


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _our_superlinks(flwr_home: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture
def flwr_home(tmp_path):
    if _port_busy(LOCAL_SUPERLINK_PORT):
        pytest.fail(f"a local SuperLink already listens on 127.0.0.1:{LOCAL_SUPERLINK_PORT}; stop it (it is not ours to kill)")
    home = tmp_path / "flwr-home"
    yield home
    for pid in _our_superlinks(home):
        os.kill(pid, signal.SIGTERM)


def test_flwr_run_composes_hydra_overrides(flwr_home, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    overrides = "data=synthetic data.num_base=1500 data.num_queries=100 index.m=4 index.nbits=6 init.local_k=64 num_clients=3 num_rounds=2 partition=dirichlet partition.alpha=0.5"
    proc = subprocess.run(
        ["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=3",
         "--run-config", f'overrides="{overrides}" output-dir="{out}"'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    summaries = list(out.rglob("summary.json"))
    assert len(summaries) == 1, log[-3000:]
    assert str(summaries[0]) in log  # the server prints where it wrote the result
    summary = json.loads(summaries[0].read_text())
    cfg = summary["config"]
    assert (cfg["num_clients"], cfg["num_rounds"], cfg["index"]["m"], cfg["partition"]["alpha"]) == (3, 2, 4, 0.5)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    # simulated shards: the figures are the simulator's truth, the private estimate beside them
    final = summary["final"]
    assert final["federated"]["source"].startswith("simulator") and 0 < final["federated"]["recall_10_at_10"] <= 1
    # under DP (the default) the private estimate is one noisy release of distortion sums
    assert final["federated_estimate"]["distortion"] > 0 and "error" in final["federated_estimate"]
    assert final["privacy"]["secure_aggregation"] is True
    dp = final["privacy"]["differential_privacy"]
    assert dp["on"] is True and 0 < dp["epsilon"] <= dp["epsilon_budget"] == 8.0 and len(dp["releases"]) == 3
    # under `flwr run` the clients' limits are their node config's (defaults here)
    assert final["privacy"]["node_limits"]["min-count"] == 5
    assert all(p["source"].startswith("node defaults") for p in final["privacy"]["node_limits_by_node"].values())
