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
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

STOP = threading.Event()
POLL_S = 0.2  # how often a wait for replies looks at the stop flag (and for replies, when no engine counts them)


class ReplyCounter:
    """Replies stored since the last :meth:`reset`, counted by an engine that sees them
    (simulations/flower_engine.py). A wait for ``n`` pending replies then pulls once
    when ``n`` may be there, instead of once per reply (a pull scans every pending id:
    pulling per reply is O(n^2) at 1,000 clients) or on a fixed tick."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def add(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self._count = 0

    def wait_for(self, n: int, timeout: float) -> None:
        """Until ``n`` replies were stored since the reset, or ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._count >= n, timeout)


REPLIES = ReplyCounter()


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
        """Flower's own push-then-pull loop, with the stop flag checked between pulls."""
        check_stop()
        return push_and_pull(self._grid, messages, timeout, POLL_S, between=check_stop)


def push_and_pull(grid: Any, messages: Iterable[Message], timeout: float | None, poll_s: float,
                  between: Callable[[], None] | None = None) -> list[Message]:
    """``Grid.send_and_receive``'s loop: push, then pull until every reply is in or
    ``timeout`` passed; between pulls, wait until as many replies were stored as are
    awaited (:data:`REPLIES`, when an engine counts them) or ``poll_s``."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending and (deadline is None or time.monotonic() < deadline):
        REPLIES.reset()  # before the pull: a reply stored during it is counted for the next wait
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            if between is not None:
                between()
            REPLIES.wait_for(len(pending), poll_s)
    return replies
