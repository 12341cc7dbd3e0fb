"""fedvec's message pump for Flower's simulation engine (simulations/flower_engine.py):
the same messages reach the same nodes and every reply comes back, the server's wait
pulls once when all replies can be there, and uninstall gives Flower's own code back."""

from __future__ import annotations

import threading
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fed_app.federation import wait_for_nodes
from fed_app.interrupts import ReplyCounter, StoppableGrid
from simulations import flower_engine

NODES, ROUNDS = 5, 3


def test_reply_counter_wakes_a_waiter_once_n_replies_were_stored():
    counter, woke = ReplyCounter(), threading.Event()

    def waiter() -> None:
        counter.wait_for(3, timeout=30)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    counter.add()
    counter.add()
    assert not woke.wait(0.2), "woke before the third reply"
    counter.add()
    assert woke.wait(10), "did not wake on the third reply"
    t.join()
    counter.reset()
    start = time.monotonic()
    counter.wait_for(1, timeout=0.05)  # nothing stored since the reset: the timeout ends the wait
    assert time.monotonic() - start >= 0.04


def test_every_message_reaches_its_node_and_every_reply_returns():
    """A real simulation (Ray) under the installed engine: each node echoes the round and
    its node id; the server checks every reply, round after round, through the same
    StoppableGrid the fedvec ServerApp uses."""
    assert flower_engine.install(0.1)
    client, server, seen = ClientApp(), ServerApp(), []

    @client.query()
    def echo(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        return Message(RecordDict({"config": ConfigRecord({"round": cfg["round"], "node": context.node_id})}), reply_to=msg)

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        grid = StoppableGrid(grid)
        nodes = wait_for_nodes(grid, NODES, 120)
        for r in range(ROUNDS):
            msgs = [Message(RecordDict({"config": ConfigRecord({"round": r})}), dst_node_id=n, message_type="query") for n in nodes]
            replies = list(grid.send_and_receive(msgs, timeout=120))
            seen.append(sorted((int(m.content["config"]["round"]), int(m.content["config"]["node"]), m.metadata.src_node_id) for m in replies))

    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=NODES,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    finally:
        flower_engine.uninstall()
    assert len(seen) == ROUNDS
    for r, replies in enumerate(seen):
        assert len(replies) == NODES, f"round {r}: {len(replies)} of {NODES} replies"
        assert all(rnd == r and node == src for rnd, node, src in replies), replies
        assert len({src for _, _, src in replies}) == NODES


def _patched() -> list[str]:
    """Which of Flower's functions are fedvec's right now (they are defined inside install)."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    funcs = {"pump": vce_api.add_messages_to_queue, "grid init": InMemoryGrid.__init__,
             "send_and_receive": InMemoryGrid.send_and_receive, "store ins": InMemoryLinkState.store_message_ins,
             "store res": InMemoryLinkState.store_message_res}
    return sorted(name for name, f in funcs.items() if f.__qualname__.startswith("install."))


def test_uninstall_gives_flowers_own_code_back():
    assert flower_engine.install(0.1)
    try:
        assert _patched() == ["grid init", "pump", "send_and_receive", "store ins", "store res"]
    finally:
        flower_engine.uninstall()
    assert _patched() == []


@pytest.mark.parametrize("version", ["1.41.0", "2.0.0"])
def test_other_flower_versions_keep_flowers_own_pump(monkeypatch, version):
    flower_engine.uninstall()
    monkeypatch.setattr(flower_engine.flwr, "__version__", version)
    assert flower_engine.install(0.1) is False
    assert _patched() == []
