"""The simulation on a Ray cluster: `ray start --head` plus a second `ray start --address`
worker node, on loopback, and `RAY_ADDRESS` pointing the run at it. The run also checks
``eval.every``: clients send no evaluate message on the rounds in between.

The head node offers no CPU to tasks, so every ClientApp actor has to run on the second
node: the run completing proves the clients ran there. Both `ray start --block`
processes (and the Ray daemons they spawned) are stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from simulations.check_summary import problems
from tests.processes import Processes, free_port

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
RUN = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6", "init.local_k=64",
       "num_clients=4", "num_rounds=3", "eval.every=2", "privacy=secagg", "save_shards=false", "eval.centralized=false"]


def alive_nodes(address: str) -> dict:
    probe = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(json.dumps({'nodes': sum(n['Alive'] for n in ray.nodes()), 'cpus': ray.cluster_resources().get('CPU', 0)}))" % address)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else {}


@pytest.mark.skipif(not RAY.is_file(), reason="the ray CLI is not installed beside this Python")
def test_simulation_runs_on_a_two_node_ray_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    with Processes(tmp_path / "logs", env=env, cwd=REPO) as procs:
        head = procs.start("ray-head", [str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                        "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={temp}", "--block"])
        head.wait_for(r"block forever", timeout=120)
        worker = procs.start("ray-worker", [str(RAY), "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                            "--num-cpus=2", "--block"])
        worker.wait_for(r"block forever", timeout=120)
        assert alive_nodes(address) == {"nodes": 2, "cpus": 2.0}
        out = tmp_path / "run"
        run = subprocess.run([sys.executable, "-m", "simulations.run", *RUN, f"hydra.run.dir={out}"], cwd=REPO,
                             env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert problems(summary, centralized=False) == []
        assert summary["final"]["federated"]["recall_10_at_10"] > 0.2
        # eval.every=2 (shared run): clients evaluate on rounds 0, 2 and the last only
        assert ["estimate.distortion" in r for r in summary["rounds"]] == [True, False, True, True]
        assert ["recall_10_at_10" in r for r in summary["rounds"]] == [True, False, True, True]
        assert head.running() and worker.running()  # the cluster outlives the run (Flower only disconnects)
