"""A faster message pump for Flower 1.42's simulation engine (simulation only).

Flower's simulation engine moves messages from its in-memory LinkState to the Ray
workers in a thread (``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the
LinkState for the next message of each node in turn. Each ask scans every stored
message and runs a validity check (expiry, federation membership) on each one, so a
pass costs O(nodes x messages) checks: with 1,000 clients and 1,000 messages in flight
that is a million checks, seconds per pass, and the dominant cost of a round. The
InMemoryGrid then polls for replies every 0.1 s.

:func:`install` replaces the pump with one that finds the same messages (the first
undelivered one of every node, in insertion order, checked before delivery) in a single
scan per pass. Both waits become event-driven: storing a message in the LinkState wakes
the pump, and the server's wait for replies (the grid's own loop and
``fed_app.interrupts.StoppableGrid``) pulls as soon as as many replies were stored as it
awaits, so a message moves as soon as it exists instead of at the next tick; ``poll_s`` is only the longest wait when nothing happens (for
expiry checks). Message contents, order and the LinkState's bookkeeping are Flower's.
It applies only to the Flower version it was written against and otherwise leaves
Flower as it is.
"""

from __future__ import annotations

import threading
from logging import WARNING
from queue import Queue
from typing import Any

import flwr
from flwr.supercore import log

from fed_app.interrupts import REPLIES, push_and_pull

FLOWER = "1.42."  # the internals below are those of this release line
_installed: dict[str, Any] = {}
_STORED = threading.Event()  # a message for a node was stored: the pump has work


def next_messages(state: Any, nodes: set[int]) -> list[Any]:
    """One pass of Flower's pump: the first undelivered message of every node, in one scan."""
    from flwr.supercore.date import now

    picked: dict[int, Any] = {}
    with state.lock:
        for msg_id, msg in list(state.message_ins_store.items()):
            md = msg.metadata
            if md.delivered_at != "" or md.dst_node_id not in nodes or md.dst_node_id in picked:
                continue
            state._check_stored_messages({msg_id})  # Flower's own expiry / federation check
            if msg_id in state.message_ins_store:
                picked[md.dst_node_id] = msg
        stamp = now().isoformat()
        for msg in picked.values():
            msg.metadata.delivered_at = stamp
    return list(picked.values())


def install(poll_s: float) -> bool:
    """Use the single-scan, event-driven pump (``poll_s``: longest idle wait); False if Flower differs."""
    if not flwr.__version__.startswith(FLOWER):
        log(WARNING, "simulations.flower_engine: written for Flower %sx, found %s; Flower's own pump is used", FLOWER, flwr.__version__)
        return False

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid import inmemory_grid

    original = _installed.setdefault("pump", vce_api.add_messages_to_queue)
    _installed.setdefault("pull", inmemory_grid.InMemoryGrid.__init__)
    _installed.setdefault("send_and_receive", inmemory_grid.InMemoryGrid.send_and_receive)
    store_ins = _installed.setdefault("store_ins", InMemoryLinkState.store_message_ins)
    store_res = _installed.setdefault("store_res", InMemoryLinkState.store_message_res)

    def store_message_ins(self: Any, message: Any) -> Any:
        stored = store_ins(self, message)
        _STORED.set()
        return stored

    def store_message_res(self: Any, message: Any) -> Any:
        stored = store_res(self, message)
        REPLIES.add()
        return stored

    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
        if not isinstance(state, InMemoryLinkState):
            return original(state, queue, nodes_mapping, f_stop)
        nodes = set(nodes_mapping.keys())
        while not f_stop.is_set():
            _STORED.clear()  # before the scan: a message stored during it sets the flag again
            for msg in next_messages(state, nodes):
                queue.put(msg)
            _STORED.wait(poll_s)

    def grid_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["pull_interval"] = poll_s
        _installed["pull"](self, *args, **kwargs)

    def send_and_receive(self: Any, messages: Any, *, timeout: float | None = None) -> list:
        """InMemoryGrid's push-then-pull loop, waking on stored replies instead of a fixed sleep."""
        return push_and_pull(self, messages, timeout, self.pull_interval)

    vce_api.add_messages_to_queue = add_messages_to_queue
    inmemory_grid.InMemoryGrid.__init__ = grid_init
    inmemory_grid.InMemoryGrid.send_and_receive = send_and_receive
    InMemoryLinkState.store_message_ins = store_message_ins
    InMemoryLinkState.store_message_res = store_message_res
    return True


def uninstall() -> None:
    """Flower's own pump, grid and LinkState again (for side-by-side measurements)."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid import inmemory_grid

    if "pump" in _installed:
        vce_api.add_messages_to_queue = _installed["pump"]
    if "pull" in _installed:
        inmemory_grid.InMemoryGrid.__init__ = _installed["pull"]
    if "send_and_receive" in _installed:
        inmemory_grid.InMemoryGrid.send_and_receive = _installed["send_and_receive"]
    if "store_ins" in _installed:
        InMemoryLinkState.store_message_ins = _installed["store_ins"]
        InMemoryLinkState.store_message_res = _installed["store_res"]
