"""Stopping a run promptly on SIGINT / SIGTERM.

The ServerApp runs in a thread that spends its time inside ``Grid.send_and_receive``,
which Flower lets wait up to ``timeout_s`` (600 s by default) for replies; a signal in
the main thread cannot reach it. The run's grid is wrapped so that every wait polls a
stop flag: once a signal sets it, the next poll (within a second) raises
:class:`Interrupted` in the server thread, Flower ends the simulation with that
exception, and ``simulations.run`` records the run as ``interrupted``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

STOP = threading.Event()
POLL_S = 0.2  # how often a wait for replies looks at the stop flag


class Interrupted(RuntimeError):
    """The run was stopped by a signal (SIGINT / SIGTERM)."""


def check_stop() -> None:
    if STOP.is_set():
        raise Interrupted("stopped by a signal (SIGINT or SIGTERM)")


class StoppableGrid:
    """A Flower Grid whose waits for replies give up when :data:`STOP` is set; every
    other call goes to the wrapped grid unchanged."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's own push-then-pull loop (``InMemoryGrid.send_and_receive``), with the
        stop flag checked between pulls."""
        check_stop()
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                check_stop()
                time.sleep(POLL_S)
        return replies
