"""Deployment security on loopback: a real flower-superlink with TLS and SuperNode
authentication, real flower-supernodes, the real `flwr` CLI (Flower 1.42).

- a SuperNode with the right CA and a registered key joins (it is "online"),
- a SuperNode without the CA, or trusting a different CA, fails the TLS handshake,
- a SuperNode whose key was never registered is refused by the SuperLink,
- the deploy scripts refuse --insecure off loopback.

Every process runs on free ports and is stopped by PID (tests/processes.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from processes import Processes, free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
CONN = "fedvec-tls-test"
TLS_FAILURE = "CERTIFICATE_VERIFY_FAILED"


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # flower-* and flwr-* of this venv
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def _run(cmd: list[str], env: dict[str, str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _json_out(proc: subprocess.CompletedProcess) -> dict:
    out = proc.stdout
    return json.loads(out[out.index("{") :])


class Federation:
    def __init__(self, root: Path, procs: Processes, env: dict[str, str], certs: Path, other_ca: Path, port: int):
        self.root, self.procs, self.env, self.certs, self.other_ca, self.port = root, procs, env, certs, other_ca, port
        self.address = f"127.0.0.1:{port}"

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["flwr", *args], self.env, check=check)

    def nodes(self) -> dict[str, str]:
        """node id -> status, as the SuperLink reports it through the Control API."""
        listing = _json_out(self.flwr("supernode", "list", CONN, "--format", "json"))
        return {str(n["node-id"]): n["status"] for n in listing["nodes"]}

    def supernode(self, name: str, ca: Path | None, key: Path | None):
        cmd = ["flower-supernode", "--superlink", self.address, "--port", str(free_port()),
               "--node-config", "partition-id=0 num-partitions=1", "--max-retries", "3"]
        if ca is not None:
            cmd += ["--root-certificates", str(ca)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return self.procs.start(name, cmd)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    env = _env(root / "flwr-home")
    certs, other = root / "certs", root / "other-ca"
    _run(["bash", SCRIPTS / "make_certs.sh", certs, "--supernodes", "3"], env)
    _run(["bash", SCRIPTS / "make_certs.sh", other], env)  # an unrelated CA
    port = free_port()
    with Processes(root / "logs", env=env, cwd=ROOT) as procs:
        link = procs.start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", certs / "ca.crt", "--ssl-certfile", certs / "server.crt",
            "--ssl-keyfile", certs / "server.key", "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database", root / "superlink.db",
        ])
        link.wait_for(r"Uvicorn running on https://", timeout=60)
        _run(["bash", SCRIPTS / "deploy/add_connection.sh", CONN, f"127.0.0.1:{port}",
              "--root-certificates", certs / "ca.crt"], env)
        yield Federation(root, procs, env, certs, other, port)


def test_registered_supernode_with_the_ca_joins(fed):
    reg = _json_out(fed.flwr("supernode", "register", str(fed.certs / "supernode-1.pub"), CONN, "--format", "json"))
    node_id = str(reg["node-id"])
    assert fed.nodes()[node_id] == "registered"

    node = fed.supernode("sn-good", ca=fed.certs / "ca.crt", key=fed.certs / "supernode-1")
    joined = node.wait_for(r"SuperNode ID: (\d+)", timeout=60)
    assert joined.group(1) == node_id
    assert fed.nodes()[node_id] == "online"
    node.stop()


def test_supernode_without_our_ca_fails_tls(fed):
    fed.flwr("supernode", "register", str(fed.certs / "supernode-2.pub"), CONN)  # registered: only TLS can stop it
    before = fed.nodes()
    nodes = [  # no CA given (system trust store), and a CA that did not sign the SuperLink's certificate
        fed.supernode("sn-no-ca", ca=None, key=fed.certs / "supernode-2"),
        fed.supernode("sn-other-ca", ca=fed.other_ca / "ca.crt", key=fed.certs / "supernode-2"),
    ]
    for node in nodes:
        rc = node.wait_exit(timeout=60)
        assert rc != 0 and TLS_FAILURE in node.log(), node.tail()
        assert "SuperNode ID" not in node.log()
    assert fed.nodes() == before  # nothing changed on the SuperLink


def test_unregistered_supernode_is_refused(fed):
    before = fed.nodes()
    node = fed.supernode("sn-unregistered", ca=fed.certs / "ca.crt", key=fed.certs / "supernode-3")
    rc = node.wait_exit(timeout=60)
    log = node.log()
    assert rc != 0 and "Failed to activate SuperNode" in log, node.tail()
    assert TLS_FAILURE not in log  # TLS was fine; the SuperLink said no
    assert "No SuperNode found with the given public key" in fed.procs.procs[0].log()
    assert fed.nodes() == before


def test_cli_without_the_ca_cannot_reach_the_superlink(fed):
    _run(["bash", SCRIPTS / "deploy/add_connection.sh", "wrong-ca", fed.address,
          "--root-certificates", fed.other_ca / "ca.crt"], fed.env)
    proc = fed.flwr("supernode", "list", "wrong-ca", check=False)
    # flwr 1.42 reports a failed handshake like any unreachable SuperLink ...
    assert proc.returncode != 0 and "Connection to the SuperLink is unavailable" in proc.stdout + proc.stderr
    # ... while the same address with the right CA answers
    assert fed.flwr("supernode", "list", CONN).returncode == 0


@pytest.mark.parametrize(
    "cmd",
    [
        ["deploy/start_superlink.sh", "--run-dir", "{tmp}", "--insecure", "--host", "0.0.0.0"],
        ["deploy/start_supernode.sh", "--run-dir", "{tmp}", "--name", "x", "--superlink", "10.1.2.3:8000",
         "--insecure", "--partition-id", "0", "--num-partitions", "1"],
        ["deploy/add_connection.sh", "remote", "example.org:8000", "--insecure"],
    ],
    ids=["superlink", "supernode", "connection"],
)
def test_insecure_mode_is_refused_off_loopback(tmp_path, cmd):
    env = _env(tmp_path / "flwr-home")
    proc = _run(["bash", SCRIPTS / cmd[0], *[c.format(tmp=tmp_path) for c in cmd[1:]]], env, check=False)
    assert proc.returncode != 0
    assert "only on loopback" in proc.stderr
    assert not (tmp_path / "pids").exists()  # nothing was started


def test_deploy_scripts_start_and_stop_exactly_their_processes(tmp_path):
    """local_federation.sh up/down on loopback (insecure: the scripts' TLS path is the
    one the fixture above runs by hand): PIDs recorded, all of them stopped by down."""
    env = _env(tmp_path / "flwr-home")
    run_dir = tmp_path / "run"
    script = SCRIPTS / "deploy/local_federation.sh"
    try:
        _run(["bash", script, "up", "--run-dir", run_dir, "-n", "1", "--insecure", "--port", str(free_port())], env, timeout=120)
        pids = {f.stem: int(f.read_text()) for f in (run_dir / "pids").glob("*.pid")}
        assert set(pids) == {"superlink", "supernode-1"}
        assert "SuperNode ID:" in (run_dir / "logs/supernode-1.log").read_text()
        _run(["bash", script, "down", "--run-dir", run_dir], env, timeout=120)
        assert not list((run_dir / "pids").glob("*.pid"))
        for pid in pids.values():
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"), pid
    finally:  # never leave them running, even when an assertion failed
        for f in (run_dir / "pids").glob("*.pid") if (run_dir / "pids").exists() else []:
            subprocess.run(["bash", SCRIPTS / "deploy/stop.sh", run_dir, f.stem], env=env, capture_output=True)
