"""Start long-running processes for tests, wait until they are ready, stop them by PID.

    with Processes(tmp_path / "logs") as procs:
        link = procs.start("superlink", ["flower-superlink", ...])
        link.wait_for(r"Uvicorn running on", timeout=60)
        ...
    # leaving the block stops every process it started, newest first

Each process writes stdout+stderr to ``<log_dir>/<name>.log``. Stopping is SIGTERM, then
SIGKILL after a grace period, for the process itself and for the children it had
spawned (Flower's SuperLink/SuperNode start SuperExec helpers, some in a new session, so
killing a process group would miss them). Only PIDs that this helper started, or that
descend from them, are signalled; a PID is re-checked against its start time first, so
a recycled PID is never hit.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from simulations.process_tree import alive as _alive
from simulations.process_tree import descendants as _descendants
from simulations.process_tree import free_port
from simulations.process_tree import signal_if_alive as _signal
from simulations.process_tree import stat as _stat

__all__ = ["Proc", "Processes", "free_port", "wait_for_port"]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


# --- processes ---------------------------------------------------------------------


class Proc:
    """One started process: its Popen, its log file, readiness and stop helpers."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path, cmd: Sequence[str]):
        self.name, self.popen, self.log_path, self.cmd = name, popen, log_path, list(cmd)
        self.start_time = (_stat(popen.pid) or (0, 0, ""))[1]
        self._orphans: list[tuple[int, int]] = []  # children of a killed process, stopped by stop()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait until the log matches ``pattern``; fail early if the process exits."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if m := rx.search(self.log()):
                return m
            if not self.running():
                if m := rx.search(self.log()):
                    return m
                raise RuntimeError(
                    f"{self.name} (PID {self.pid}) exited with {self.popen.returncode} "
                    f"before its log showed {pattern!r}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r} in the log after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit on its own; its return code."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} (PID {self.pid}) still runs after {timeout:.0f}s:\n{self.tail()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Kill the process alone (a crash, as in a fault test) and wait for it.

        Its children are remembered (they get re-parented, so they could not be found
        later) and stopped by :meth:`stop`."""
        if self.running():
            self._orphans += _descendants(self.pid)
            _signal(self.pid, self.start_time, sig)
        return self.popen.wait(timeout=10)

    def stop(self, grace: float = 10.0, children_grace: float = 5.0) -> int | None:
        """SIGTERM, SIGKILL after ``grace``; then the same for children left behind."""
        kids = _descendants(self.pid) if self.running() else []
        for orphan in self._orphans:  # and whatever they started since
            kids += [orphan, *(_descendants(orphan[0]) if _alive(*orphan) else [])]
        if self.running():
            _signal(self.pid, self.start_time, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal(self.pid, self.start_time, signal.SIGKILL)
                self.popen.wait(timeout=10)
        # Children monitor their parent and normally exit by themselves.
        deadline = time.monotonic() + children_grace
        while any(_alive(*k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for k in kids:
            _signal(*k, signal.SIGTERM)
        deadline = time.monotonic() + 2
        while any(_alive(*k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for k in kids:
            _signal(*k, signal.SIGKILL)
        return self.popen.returncode


class Processes:
    """Starts processes and, on exit (or ``stop_all``), stops all of them."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})}, cwd=self.cwd,
            )
        proc = Proc(name, popen, log_path, cmd)
        self.procs.append(proc)
        return proc

    def stop(self, procs: Iterable[Proc]) -> None:
        for p in procs:
            p.stop()

    def stop_all(self) -> None:
        errors = []
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{p.name}: {exc}")
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
