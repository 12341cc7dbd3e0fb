"""A deployed federation end to end, with real processes on loopback (Flower 1.42):
one flower-superlink, four flower-supernodes each holding its own persisted shard
(``--node-config 'shard-dir="..."'``), the real ``flwr`` CLI submitting runs.

Every run uses the default privacy group (conf/privacy/secure.yaml): secure aggregation
with double masking and central DP (epsilon 8 over at most 11 releases). The nodes take
their limits from their own node config over those defaults; they set only
``dp-clip=8.0`` (the synthetic vectors have norms of 2 to 6.3, which that clip leaves
whole; the default clip of 1 is meant for L2-normalised data), and the server says the
same (``privacy.dp_clip=8.0``) so that summary.json reports the clip the nodes applied.
Four nodes: with the default secagg-threshold=0.7 a roster of 4 needs t=3, so one node
may drop out of a sum (with 3 nodes t=3 and none may).

1. Four disjoint shards are imported with ``python -m vector_index import`` (PQ 4x6,
   unencoded until a global model arrives).
2. A training run (2 rounds) writes summary.json and global_model.npz; every round is one
   secure sum of the 4 nodes' noisy statistics, the private evaluation one more after the
   last round; final.privacy says secure aggregation and DP were on, with the epsilon
   spent within the budget. Afterwards every shard has saved a version encoded with the
   run's global model version.
3. A search-mode run returns the merged, node-qualified top-k; it equals one faiss
   index built with the same global model over the union of the four shards (ids
   exactly, distances on the nodes' default 0.001 grid; at tied distances the ids are
   compared as sets), and every hit names the SuperNode that holds its id. A search
   with k above the nodes' default max-k is refused by every SuperNode, by name.
4. A training run where one SuperNode is SIGKILLed in the middle of round 1's secure
   aggregation (after it sent its encrypted key shares, before its masked input) still
   finishes: the server recovers the dead node's mask key from the survivors' Shamir
   shares and unmasks the sum of the 3 survivors, and later rounds sum the 3 survivors;
   summary.json's missing_nodes and the server log name that node (for the rounds until
   the SuperLink, missing its heartbeats, stops sampling it).

Insecure mode (no TLS): TLS and SuperNode authentication are covered by test_tls_auth.py.
Every process runs on free ports and is stopped by PID (tests/processes.py), also when
an assertion fails. Skipped only when flower-superlink is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from processes import Proc, Processes, free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
CONN = "fedvec-deploy-test"
N_SHARDS, DIM, K = 4, 16, 10
NODE_DP_CLIP = 8.0  # every SuperNode's own dp-clip (node config); the rest of its limits are the defaults
TRAIN_OVERRIDES = ("data=synthetic data.num_base=1500 data.num_queries=100 index.m=4 index.nbits=6 "
                   f"init.local_k=64 num_clients={N_SHARDS} eval.centralized=false privacy.dp_clip={NODE_DP_CLIP}")
# seconds for one `flwr run --stream`: under secure aggregation a round is 4 messages per node,
# each a fresh ClientApp process. Measured on 2 cores shared with other jobs (load average
# 10-20): training run 880 s, fault run 420 s (Flower restarts a ClientApp process that takes
# over 30 s to start, which a loaded machine makes common)
RUN_TIMEOUT = 1200
SECURE_SUM = re.compile(r"round (\d+) (train|evaluate): secure sum of (\d+) client\(s\) \(threshold (\d+) of (\d+)\)")
# Flower's log of aggregate_train's metrics; "clients" is a secure sum of ones, noise-free even
# under DP: it decodes to exactly the number of clients summed only if every mask was removed
SUMMED_CLIENTS = re.compile(r"round \d+ train: secure sum of (\d+) client\(s\)")  # fedvec's own line (Flower's record dumps are filtered)

VENV_BIN = Path(sys.executable).parent
SEARCH_PATH = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=SEARCH_PATH) is None,
    reason="flower-superlink is not on PATH (install the project: scripts/setup.sh)",
)


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = SEARCH_PATH  # flower-* and flwr-* of this venv; SuperExec spawns them by name
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def _run(cmd: list, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class FlwrRun:
    """``flwr run . <conn> --stream``: output streamed line by line into a log file, an
    optional callback sees every line (to act at a point of the run)."""

    def __init__(self, env: dict[str, str], log_path: Path, run_config: str, on_line=None):
        self.log_path, self.on_line, self.lines, self.env = log_path, on_line, [], env
        self.popen = subprocess.Popen(
            ["flwr", "run", ".", CONN, "--stream", "--run-config", run_config],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.callback_error: BaseException | None = None
        self.run_id: str | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.popen.stdout:
                self.lines.append(line)
                if self.run_id is None and (m := re.search(r"Successfully started run (\d+)", line)):
                    self.run_id = m.group(1)
                log.write(line)
                log.flush()
                if self.on_line is not None and self.callback_error is None:
                    try:
                        self.on_line(line)
                    except BaseException as exc:  # reported by wait()
                        self.callback_error = exc

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> str:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"flwr run did not finish in {timeout:.0f}s:\n{self.output[-4000:]}") from None
        finally:
            self.reader.join(timeout=10)
        if self.callback_error is not None:
            raise self.callback_error
        out = self.output
        assert self.popen.returncode == 0, f"flwr run exited with {self.popen.returncode}:\n{out[-4000:]}"
        # flwr run --stream exits 0 even when the ServerApp raised: look at the log too
        assert "ServerApp raised an exception" not in out, out[-5000:]
        return out

    def stop(self) -> None:
        """The CLI, and the run it submitted (``flwr stop``: a run left going in the
        SuperLink would hold up the next test's run); the processes are the fixture's."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
            if self.run_id is not None:
                subprocess.run(["flwr", "stop", self.run_id, CONN], cwd=ROOT, env=self.env, capture_output=True, timeout=60)


class Deployment:
    def __init__(self, root: Path, env: dict[str, str], procs: Processes, base: np.ndarray, queries: np.ndarray,
                 shard_ids: list[np.ndarray], shard_dirs: list[Path], nodes: list[Proc], node_ids: list[int]):
        self.root, self.env, self.procs = root, env, procs
        self.base, self.queries = base, queries
        self.shard_ids, self.shard_dirs, self.nodes, self.node_ids = shard_ids, shard_dirs, nodes, node_ids
        self.runs: list[FlwrRun] = []

    def flwr_run(self, name: str, run_config: str, on_line=None) -> FlwrRun:
        run = FlwrRun(self.env, self.root / "logs" / f"flwr-run-{name}.log", run_config, on_line)
        self.runs.append(run)
        return run

    def logs(self) -> str:
        """Tails of every process log, for failure messages."""
        return "\n".join(f"---- {p.name} (PID {p.pid})\n{p.tail(15)}" for p in self.procs.procs)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from vector_index.datasets import make_synthetic
    from vector_index.partition import iid

    root = tmp_path_factory.mktemp("deploy")
    env = _env(root / "flwr-home")
    data = make_synthetic(num_base=1500, num_queries=100, dim=DIM, num_clusters=20, seed=0)
    shard_ids = iid(data.base, N_SHARDS, seed=0)  # row numbers: disjoint global ids
    shard_dirs = [root / f"org{i + 1}" / "shard" for i in range(N_SHARDS)]
    importers = []
    for i, (ids, sdir) in enumerate(zip(shard_ids, shard_dirs)):
        np.save(root / f"vectors-{i}.npy", data.base[ids])
        np.save(root / f"ids-{i}.npy", ids)
        importers.append(subprocess.Popen(
            [sys.executable, "-m", "vector_index", "import", str(root / f"vectors-{i}.npy"), str(sdir),
             "--ids", str(root / f"ids-{i}.npy"), "--index", "pq", "--m", "4", "--nbits", "6"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for imp in importers:
        out, _ = imp.communicate(timeout=120)
        assert imp.returncode == 0, out

    port = free_port()
    (root / "link").mkdir()
    with Processes(root / "logs", env=env, cwd=root / "link") as procs:
        link = procs.start("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ])
        link.wait_for(r"Uvicorn running on http://", timeout=90)
        _run(["bash", SCRIPTS / "deploy/add_connection.sh", CONN, f"127.0.0.1:{port}", "--insecure"], env)
        nodes = [
            procs.start(f"supernode-{i + 1}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f'shard-dir="{sdir}" partition-id={i} num-partitions={N_SHARDS} dp-clip={NODE_DP_CLIP}',
            ])
            for i, sdir in enumerate(shard_dirs)
        ]
        node_ids = [int(n.wait_for(r"SuperNode ID: (\d+)", timeout=90).group(1)) for n in nodes]
        dep = Deployment(root, env, procs, data.base, data.queries, shard_ids, shard_dirs, nodes, node_ids)
        try:
            yield dep
        finally:
            for run in dep.runs:
                run.stop()
            # leaving the Processes block stops the SuperNodes, then the SuperLink (and children)


# -- helpers ------------------------------------------------------------------------


def _summary(out: Path) -> tuple[Path, dict]:
    found = list(out.rglob("summary.json"))
    assert len(found) == 1, f"expected one summary.json under {out}, found {found}"
    return found[0], json.loads(found[0].read_text())


def on_grid(ref_d: np.ndarray, fed_d: np.ndarray, grid: float, k: int) -> np.ndarray:
    """The single index's distances rounded to the nodes' grid. One within a few float32
    ulps of a midpoint between grid values may round either way: a node's faiss sums the
    same terms over its own shard and can land 1 ulp away (measured: 7.3675 on the node,
    7.3675003 in the union index); there the node's rounding counts when it is one of the
    two."""
    x = ref_d.astype(np.float64)
    mid = (np.floor(x / grid) + 0.5) * grid
    rounded = np.round(x / grid) * grid
    other = np.where(rounded > mid, mid - grid / 2, mid + grid / 2)
    near_mid = np.abs(x - mid) <= 4 * np.spacing(np.abs(ref_d).astype(np.float32))
    take = near_mid[:, :k] & (np.abs(fed_d - other[:, :k]) <= grid / 10)
    rounded[:, :k] = np.where(take, other[:, :k], rounded[:, :k])
    return rounded.astype(np.float32)


def assert_same_topk(fed_d: np.ndarray, fed_i: np.ndarray, ref_d: np.ndarray, ref_i: np.ndarray, k: int, tol: float = 1e-4) -> int:
    """Federated top-k equals the single index's top-k; ``ref_*`` hold more than k columns
    so that ties at the k-th distance can be checked. Returns how many slots differed by a
    tie (same distance, another id)."""
    assert fed_d.shape == fed_i.shape == (ref_d.shape[0], k)
    np.testing.assert_allclose(fed_d, ref_d[:, :k], rtol=0, atol=tol)
    ties = 0
    for q in range(fed_i.shape[0]):
        row = fed_i[q]
        assert (row >= 0).all() and np.unique(row).size == k, f"query {q}: padding or duplicate ids {row}"
        for j in np.flatnonzero(row != ref_i[q, :k]):
            tied = np.abs(ref_d[q] - fed_d[q, j]) <= tol
            assert not tied[-1], f"query {q}: a tie group longer than the reference list; raise its length"
            assert row[j] in ref_i[q][tied], (
                f"query {q}, rank {j}: id {row[j]} at distance {fed_d[q, j]} is not among the single index's ids "
                f"at that distance {ref_i[q][tied]}")
            ties += 1
        # ranks with a unique distance are ids exactly; tie groups as sets (inside the top-k)
        for d in np.unique(fed_d[q]):
            in_fed = np.abs(fed_d[q] - d) <= tol
            in_ref = np.abs(ref_d[q, :k] - d) <= tol
            if not in_fed[-1] and not in_ref[-1]:  # the group ends inside the top-k: sets equal
                assert set(row[in_fed]) == set(ref_i[q, :k][in_ref]), f"query {q}: tied ids differ at distance {d}"
    return ties


# -- tests --------------------------------------------------------------------------


def test_train_deploy_then_search_equals_one_index(deployment):
    from vector_index.quantizers import IndexSpec, empty_index, with_transform
    from vector_index.store import Shard

    dep = deployment
    t0 = time.monotonic()
    for sdir in dep.shard_dirs:  # freshly imported: raw vectors only
        assert Shard.open(sdir).model_version is None

    # -- training ------------------------------------------------------------------
    out = dep.root / "train"
    run = dep.flwr_run("train", f'overrides="{TRAIN_OVERRIDES} num_rounds=2" output-dir="{out}"')
    log = run.wait(RUN_TIMEOUT)
    t_train = time.monotonic() - t0
    summary_path, summary = _summary(out)
    assert str(summary_path) in log, log[-3000:]  # the server prints where it wrote the summary
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert [r.get("clients") for r in summary["rounds"][1:]] == [N_SHARDS, N_SHARDS]
    # deployed shards are not the simulator's: the figures are the private estimate, and say so.
    # Under DP the private evaluation is one noisy release after the last round, of sums of
    # distortion, energy and the count: the per-shard recall estimate has no small per-vector
    # sensitivity and is not released (docs/secure_aggregation.md)
    final = summary["final"]
    assert final["federated"]["source"].startswith("federation's private estimate"), final["federated"]
    assert np.isfinite(final["federated"]["relative_distortion"]) and "recall_10_at_10" not in final["federated"]
    assert "centralized" not in final
    assert "estimate.distortion" not in summary["rounds"][1] and "estimate.distortion" in summary["rounds"][2]
    assert final["privacy"]["eval_protocol"] == "private"
    assert final["privacy"]["node_limits"]["max-k"] == 100 and final["privacy"]["node_limits"]["min-count"] == 5
    by_node = final["privacy"]["node_limits_by_node"]
    assert sorted(int(n) for n in by_node) == sorted(dep.node_ids), by_node
    for p in by_node.values():  # each node's own limits: its node config over conf/privacy/secure.yaml
        assert p["source"] == "node config (dp-clip)" and p["dp-clip"] == NODE_DP_CLIP, p
        assert (p["secure-aggregation"], p["dp-epsilon"], p["secagg-threshold"], p["secagg-min-clients"]) == (1, 8.0, 0.7, 3), p
    assert not summary["missing_nodes"], summary["missing_nodes"]
    assert (summary["config"]["num_clients"], summary["config"]["index"]["m"]) == (N_SHARDS, 4)

    # secure aggregation + DP: every round one secure sum of all 4 nodes (t=3 of 4), then the
    # evaluation; summary.json accounts for exactly those noisy releases
    privacy = final["privacy"]
    assert privacy["secure_aggregation"] is True
    dp = privacy["differential_privacy"]
    assert dp["on"] is True and 0 < dp["epsilon"] <= dp["epsilon_budget"] == 8.0, dp
    assert dp["clip_l2"] == NODE_DP_CLIP and dp["max_releases"] == 11, dp
    assert [(r["round"], r["phase"], r["clients"], r["threshold"]) for r in dp["releases"]] == [
        (1, "train", N_SHARDS, 3), (2, "train", N_SHARDS, 3), (2, "evaluate", N_SHARDS, 3)], dp["releases"]
    assert all(r["noise_multiplier"] > 0 for r in dp["releases"]), dp["releases"]
    sums = [(int(r), phase, int(n), int(t), int(of)) for r, phase, n, t, of in SECURE_SUM.findall(log)]
    n = N_SHARDS
    assert sums == [(1, "train", n, 3, n), (2, "train", n, 3, n), (2, "evaluate", n, 3, n)], (sums, log[-3000:])
    assert [float(c) for c in SUMMED_CLIENTS.findall(log)] == [n, n], log[-3000:]
    assert "secure aggregation aborted" not in log and "dropped from the secure sum" not in log, log[-3000:]

    model_path = summary_path.parent / "global_model.npz"
    assert model_path.is_file(), f"no global_model.npz beside {summary_path}: {sorted(p.name for p in summary_path.parent.iterdir())}"
    with np.load(model_path) as z:
        model = {k: z[k] for k in z.files}
    assert {"transform.A", "transform.b", "codebook.pq", "model_version"} <= set(model), sorted(model)
    a, b, books = model["transform.A"], model["transform.b"], model["codebook.pq"]
    version = int(model["model_version"])
    assert a.shape == (DIM, DIM) and b.shape == (DIM,) and books.shape == (4, 64, DIM // 4)

    # every shard re-encoded and saved with this global model; ids and vectors untouched
    for sdir, ids in zip(dep.shard_dirs, dep.shard_ids):
        shard = Shard.open(sdir)
        assert shard.encoded and shard.model_version == version, (sdir, shard.model_version, version)
        assert np.array_equal(np.sort(shard.ids), ids)
        assert np.array_equal(shard.vectors(ids), dep.base[ids])

    # -- search --------------------------------------------------------------------
    t1 = time.monotonic()
    qpath, hits = dep.root / "queries.npy", dep.root / "search" / "hits.npz"
    np.save(qpath, dep.queries)
    run = dep.flwr_run("search", f'mode="search" queries="{qpath}" results="{hits}" k={K} '
                                 f'overrides="{TRAIN_OVERRIDES} num_rounds=2"')
    log = run.wait(RUN_TIMEOUT)
    t_search = time.monotonic() - t1
    assert hits.is_file(), log[-3000:]
    with np.load(hits) as z:
        fed_d, fed_i, fed_n = z["distances"], z["ids"], z["nodes"]
    sidecar = json.loads(hits.with_suffix(".json").read_text())
    assert sorted(sidecar["answered"]) == sorted(dep.node_ids) and sidecar["missing"] == []
    assert {int(v) for v in sidecar["model_versions"].values()} == {version}
    assert fed_d.shape == fed_i.shape == fed_n.shape == (dep.queries.shape[0], K)

    # one faiss index, same global model, over the union of the shards
    union_ids = np.concatenate(dep.shard_ids)
    index = with_transform(empty_index(IndexSpec("pq", m=4, nbits=6), DIM, {"pq": books}), a, b)
    index.add_with_ids(np.ascontiguousarray(dep.base[union_ids]), union_ids)
    # the whole union, ranked: under DP noise on 1,500 vectors many share a code, and a tie
    # group at the k-th distance measured longer than 40 (no cut-off can be too short now)
    ref_d, ref_i = index.search(dep.queries, index.ntotal)
    grid = 0.001  # the nodes' default distance-grid: answers carry rounded compressed distances
    assert np.allclose(fed_d / grid, np.round(fed_d / grid), atol=1e-3), "distances are not on the node's grid"
    ties = assert_same_topk(fed_d, fed_i, on_grid(ref_d, fed_d, grid, K), ref_i, K, tol=grid / 10)

    # every hit is qualified by the SuperNode that holds its id (ids are disjoint)
    owner = np.empty(dep.base.shape[0], dtype=np.int64)
    for s, ids in enumerate(dep.shard_ids):
        owner[ids] = s
    for s in range(N_SHARDS):
        got = set(fed_n[owner[fed_i] == s].tolist())
        assert got <= {dep.node_ids[s]}, f"hits from shard {s} are attributed to node(s) {got}, not {dep.node_ids[s]}"
    assert set(fed_n.ravel().tolist()) == set(dep.node_ids)  # 1000 hits: every shard contributes
    print(f"\ntraining run {t_train:.0f}s, search run {t_search:.0f}s, {ties} slot(s) matched as ties")


def test_supernodes_refuse_k_above_their_limit(deployment):
    """An active server asks for more neighbours than a SuperNode allows (its default
    max-k=100): every node refuses by name, no hit is written, nothing is truncated."""
    dep = deployment
    qpath, hits = dep.root / "queries.npy", dep.root / "search-refused" / "hits.npz"
    np.save(qpath, dep.queries)
    run = dep.flwr_run("search-refused", f'mode="search" queries="{qpath}" results="{hits}" k=500 '
                                         f'overrides="{TRAIN_OVERRIDES}"')
    run.popen.wait(timeout=RUN_TIMEOUT)
    run.reader.join(timeout=10)
    log = run.output
    assert not hits.exists(), "a refused search must not produce hits"
    sidecar = json.loads(hits.with_suffix(".json").read_text())
    assert sidecar["answered"] == [] and sorted(int(n) for n in sidecar["refused"]) == sorted(dep.node_ids), sidecar
    assert all("max-k" in why and "k=500" in why and "max-k=100" in why for why in sidecar["refused"].values()), sidecar
    assert "query refused by every shard" in log and "max-k=100" in log, log[-3000:]


def test_too_few_supernodes_fails_fast_visibly_and_with_a_nonzero_exit(deployment):
    """num_clients above the connected SuperNodes: the ServerApp fails after nodes_wait_s
    (not timeout_s), naming the count it saw; the run's own directory holds failed.json,
    the log's last fedvec line says RUN FAILED, and scripts/flwr-run.sh exits 1 with
    Flower's status (plain `flwr run --stream` exits 0 in Flower 1.42)."""
    dep = deployment
    out = dep.root / "out-too-few"
    run_config = f'overrides="{TRAIN_OVERRIDES} num_clients={N_SHARDS + 2} nodes_wait_s=5" output-dir="{out}"'
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPTS / "flwr-run.sh"), ".", CONN, "--run-config", run_config],
                          env=dep.env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    took = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert f"only {N_SHARDS} SuperNode(s) connected after nodes_wait_s=5s but num_clients={N_SHARDS + 2}" in log, log[-3000:]
    assert "fedvec: RUN FAILED" in log and "ended finished:failed" in proc.stderr, log[-3000:]
    failed = list(out.rglob("failed.json"))
    assert len(failed) == 1 and not list(out.rglob("summary.json")), failed
    record = json.loads(failed[0].read_text())
    assert record["status"] == "failed" and "nodes_wait_s=5s" in record["message"], record
    assert took < 600, took  # below the default timeout_s: it did not wait for replies
    print(f"too few SuperNodes: failed after {took:.1f} s (nodes_wait_s=5, including the run's start-up)")


def test_supernode_killed_mid_training_is_reported_missing(deployment):
    """One SuperNode is SIGKILLed in the middle of round 1's secure aggregation, right after
    it sent its encrypted key shares (so the survivors' masks cover it) and before it sent
    its masked input: the server must rebuild its pairwise masks from its mask key, which
    it recovers from the survivors' Shamir shares (t=3 of a roster of 4)."""
    dep = deployment
    victim = dep.nodes[-1]
    victim_id = dep.node_ids[-1]
    assert victim.running(), dep.logs()
    offset = victim.log_path.stat().st_size  # the fixture's SuperNodes served the earlier tests' runs
    killed, done, errors = threading.Event(), threading.Event(), []

    def kill_after_sharing() -> None:
        """Round 1 is this run's first secure sum (under DP nothing is evaluated before it),
        and a node's first query.secagg reply is its key shares (stage "share")."""
        try:
            while not done.is_set():
                with open(victim.log_path, "rb") as f:
                    f.seek(offset)
                    text = f.read()
                at = text.find(b"Sending: query.secagg message")
                if at >= 0 and b"Sent successfully" in text[at:]:
                    victim.kill()  # SIGKILL, by the PID we started; its children are stopped at teardown
                    killed.set()
                    return
                time.sleep(0.05)
        except BaseException as exc:  # reported below
            errors.append(exc)

    watcher = threading.Thread(target=kill_after_sharing, daemon=True)
    watcher.start()
    out = dep.root / "faults"
    t0 = time.monotonic()
    # the default timeout_s (600) costs nothing here: once the dead node's heartbeats lapse
    # (2 x 30 s) the SuperLink answers for it with "Node Unavailable" and stops sampling it,
    # while a long timeout keeps a live node slow to start (a loaded machine) in the sums
    overrides = f"{TRAIN_OVERRIDES} num_rounds=3 min_clients=3"
    run = dep.flwr_run("faults", f'overrides="{overrides}" output-dir="{out}"')
    try:
        log = run.wait(RUN_TIMEOUT)
    finally:
        done.set()
        watcher.join(timeout=10)
    elapsed = time.monotonic() - t0
    if errors:
        raise errors[0]
    assert killed.is_set(), f"the victim never sent its key shares in this run:\n{victim.tail()}\n{log[-3000:]}"
    assert not victim.running()

    _, summary = _summary(out)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    missing = {int(r): ids for r, ids in summary["missing_nodes"].items()}
    assert missing, f"summary.json records no missing node: {summary['missing_nodes']}"
    assert all(ids == [victim_id] for ids in missing.values()), (missing, victim_id)
    # dead from round 1 on: missing in that round, and until the SuperLink stops sampling it
    # (no heartbeat for 2 x its interval marks it offline)
    assert 1 in missing and set(missing) <= {1, 2, 3}, missing
    assert [r["clients"] for r in summary["rounds"][1:]] == [N_SHARDS - 1] * 3, summary["rounds"]
    assert re.search(rf"no usable reply from node\(s\) \[{victim_id}\]", log), log[-3000:]

    # round 1: the victim joined the roster of 4, was dropped at the mask stage, and the sum
    # of the 3 survivors was still unmasked (their count of clients decodes to exactly 3);
    # every later sum is of the 3 survivors
    assert re.search(rf"round 1 train: secure sum of {N_SHARDS - 1} client\(s\) \(threshold 3 of {N_SHARDS}\); "
                     rf"dropped \[{victim_id}\]", log), log[-3000:]
    assert re.search(rf"round 1: dropped from the secure sum: node {victim_id}: mask: ", log), log[-3000:]
    sums = [(int(r), phase, int(n)) for r, phase, n, _, _ in SECURE_SUM.findall(log)]
    assert sums == [(1, "train", 3), (2, "train", 3), (3, "train", 3), (3, "evaluate", 3)], (sums, log[-3000:])
    assert [float(c) for c in SUMMED_CLIENTS.findall(log)] == [N_SHARDS - 1] * 3, log[-3000:]
    assert "secure aggregation aborted" not in log, log[-3000:]
    dp = summary["final"]["privacy"]["differential_privacy"]
    assert [r["clients"] for r in dp["releases"]] == [N_SHARDS - 1] * 4 and dp["epsilon"] <= dp["epsilon_budget"], dp
    print(f"\nfault run {elapsed:.0f}s; missing nodes per round {missing}")
