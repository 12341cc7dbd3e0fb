"""A process and its descendants, by PID, from /proc (Linux): who a started process
spawned (Flower's SuperLink and SuperNodes start SuperExec helpers, some in a new
session, so a process group would miss them), whether a PID is still the process we
started (its start time guards against a recycled PID), and signalling only those.

Shared by the tests' process helper (tests/processes.py) and the benchmarks that start
or measure real process trees (benchmark_deploy, benchmark_scale).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after "pid (comm) ", None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of a live PID, None if gone."""
    f = _fields(pid)
    return None if f is None else (int(f[1]), int(f[19]), f[0])


def cpu_ticks(pid: int) -> int:
    """utime + stime of a live PID in clock ticks (0 if gone)."""
    f = _fields(pid)
    return 0 if f is None else int(f[11]) + int(f[12])


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := stat(int(entry))) is not None:
            children.setdefault(st[0], []).append((int(entry), st[1]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def alive(pid: int, start: int) -> bool:
    """``pid`` is still the process that started at ``start`` and not a zombie."""
    st = stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"


def signal_if_alive(pid: int, start: int, sig: int) -> None:
    if alive(pid, start):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
