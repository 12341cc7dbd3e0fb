"""Secure aggregation inside real Flower simulations: the same model as the plain
protocol up to fixed-point rounding, nodes that vanish mid-session cost only their own
contribution, a session below its threshold aborts cleanly, and DP is accounted."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fed_app.config import compose_config
from fed_app.federation import run_federation
from fed_app.privacy.dp import epsilon_spent
from simulations.run import simulate

SMALL = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6",
         "num_clients=4", "num_rounds=2", "privacy.dp_clip=8.0", "save_shards=false", "eval.centralized=false"]


class DroppingGrid(Grid):
    """Loses the replies ``drop(stage, batch, node)`` picks, as if the node died after
    receiving (``batch`` counts the secure-aggregation stage batches of that stage)."""

    def __init__(self, grid: Grid, drop: Callable[[str, int, int], bool]) -> None:
        self._grid, self.drop, self.batches = grid, drop, {}

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = stage_of(messages[0]) if messages else ""
        batch = self.batches[stage] = self.batches.get(stage, 0) + 1
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        return [r for r in replies if not self.drop(stage, batch, r.metadata.src_node_id)]

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    @property
    def run(self):
        return self._grid.run


def stage_of(msg: Message) -> str:
    if msg.metadata.message_type != "query.secagg":
        return msg.metadata.message_type
    return str(msg.content["secagg"]["stage"])


def run(tmp: Path, overrides: list[str], drop: Callable[[Message, Message], bool] | None = None) -> tuple[dict, DroppingGrid | None]:
    cfg = compose_config([*SMALL, *overrides])
    holder = {}
    app = None
    if drop is not None:
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            holder["grid"] = DroppingGrid(grid, drop)
            run_federation(holder["grid"], cfg, tmp)

    path = simulate(cfg, tmp, server_app=app)
    return json.loads(Path(path).read_text()), holder.get("grid")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run(tmp_path_factory.mktemp("trusted"), ["privacy=trusted", "privacy.examples_digits=0"])[0]


@pytest.fixture(scope="module")
def secagg(tmp_path_factory):
    return run(tmp_path_factory.mktemp("secagg"), ["privacy=secagg", "privacy.examples_digits=0"])[0]


def test_secure_aggregation_trains_the_plain_model_up_to_fixed_point(plain, secagg):
    a, b = plain["final"]["federated"], secagg["final"]["federated"]
    assert secagg["final"]["privacy"]["secure_aggregation"] is True and plain["final"]["privacy"]["secure_aggregation"] is False
    assert b["distortion"] == pytest.approx(a["distortion"], rel=1e-3)
    assert b["recall_10_at_10"] == pytest.approx(a["recall_10_at_10"], abs=0.01)
    assert any("unmasked" in w for w in plain["final"]["privacy"]["warnings"])
    assert all(r["clients"] == 4 for r in secagg["rounds"][1:])


def test_a_node_lost_mid_session_costs_only_its_contribution(tmp_path):
    """Sessions under secagg: round 0 evaluate, round 1 train, round 1 evaluate, round 2
    train... The largest node dies after receiving the 2nd mask stage (round 1 train),
    and stays dead: that round sums the 3 others, and so does every later one."""
    dead = {}

    def drop(stage, batch, node):
        if stage == "mask" and batch == 2:
            dead.setdefault("node", node)  # the first to answer that stage dies with its answer
        return dead.get("node") == node

    summary, grid = run(tmp_path, ["privacy=secagg"], drop=drop)
    assert grid.batches["mask"] >= 5
    rounds = summary["rounds"]
    assert [r["clients"] for r in rounds[1:]] == [3.0, 3.0]
    assert summary["missing_nodes"]["1"] == [dead["node"]] and summary["missing_nodes"]["2"] == [dead["node"]]
    assert rounds[2]["distortion"] < rounds[0]["distortion"]  # the 3 survivors still trained the model


def test_below_the_threshold_a_round_aborts_cleanly_and_the_run_goes_on(tmp_path):
    """Two of four nodes lose their masked input in round 1's training session (t = 3):
    the round aborts with the model unchanged; round 2 trains with all four again."""
    lost = []

    def drop(stage, batch, node):
        if stage == "mask" and batch == 2:
            if len(lost) < 2 and node not in lost:
                lost.append(node)
            return node in lost
        return False

    summary, _ = run(tmp_path, ["privacy=secagg"], drop=drop)
    r0, r1, r2 = summary["rounds"]
    assert r1["clients"] == 0.0 and r1["distortion"] == pytest.approx(r0["distortion"])
    assert len(summary["missing_nodes"]["1"]) == 4  # no node's statistics made it into round 1
    assert r2["clients"] == 4.0 and r2["distortion"] < r1["distortion"]


def test_dp_epsilon_is_dp_accountings_for_the_releases_made(tmp_path):
    summary, _ = run(tmp_path, ["privacy=secure", "privacy.dp_epsilon=4"])
    dp = summary["final"]["privacy"]["differential_privacy"]
    assert dp["on"] is True and len(dp["releases"]) == 3  # 2 training rounds + the final evaluation
    z = [r["noise_multiplier"] for r in dp["releases"]]
    assert dp["epsilon"] == pytest.approx(epsilon_spent(z, dp["delta"]), abs=1e-3)
    assert dp["epsilon"] < 4.0  # calibrated for dp_max_releases=11, 3 made
    assert dp["delta"] <= 1.0 / 1500
