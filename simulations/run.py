"""One experiment (or a sweep with -m) in-process with Flower's simulation engine.

    python -m simulations.run num_rounds=5 partition=dirichlet
    python -m simulations.run -m strategy=fedlloyd,avg_refined num_clients=10,50
    python -m simulations.report multirun/<date>/<time>     # table + plots of a sweep

Every run writes ``timing.json`` (job wall time, status) into its directory, and a run
that raises writes ``failed.json`` (overrides, error type, message, traceback) instead of
``summary.json``. A failed run does not stop a sweep: every combination runs, and the
process exits non-zero at the end if any of them failed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fed_app.client_app import make_client_app
from fed_app.config import CONF_DIR, load_experiment, to_plain, validate
from fed_app.experiment import Experiment
from fed_app.interrupts import STOP
from fed_app.local_data import load_dataset
from fed_app.privacy.policy import ClientPolicy
from fed_app.quiet_log import quiet_flower
from fed_app.server_app import make_server_app
from fed_app.summary import DirtyRunDir, check_fresh_run_dir, write_failure
from simulations import flower_engine


RAY_INIT_ARGS = {"logging_level": "ERROR", "log_to_driver": True}


def _start_ray(init_args: dict[str, Any]) -> None:
    """Start Ray as Flower's Ray backend would (``RayBackend.init_ray``: no dashboard,
    this process's sys.path for the workers), but keep this process's SIGTERM handler:
    ``ray.init`` replaces it with one that raises SystemExit in the main thread, which
    leaves the ServerApp thread waiting for replies and the process aborting. Flower then
    finds Ray running and uses it (and shuts it down at the end of the run)."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs: silences Ray's FutureWarning about them
    ours = signal.getsignal(signal.SIGTERM)
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False, **init_args)
    if threading.current_thread() is threading.main_thread() and ours is not None:
        signal.signal(signal.SIGTERM, ours)


def simulate(config: dict | Experiment, out_dir: Path, server_app: ServerApp | None = None, client_mods: list | None = None) -> Path:
    """Run the ServerApp and ClientApps in this process; returns summary.json's path.

    ``server_app``: another ServerApp over the same config (the attack suite's server);
    ``client_mods``: Flower mods wrapped around every ClientApp (hostile clients).
    """
    logging.getLogger("flwr").propagate = False  # Hydra's root handler would print twice
    check_fresh_run_dir(out_dir)  # before any client starts
    cfg = load_experiment(config)  # every key's type and range
    data = load_dataset(cfg.data)  # cached: the in-process ServerApp reuses it
    cfg = validate(cfg, data.base.shape[1], data.base.shape[0], None if cfg.init.public_path else data.queries.shape[0])  # before any client starts
    _start_ray(RAY_INIT_ARGS)
    with quiet_flower(cfg.verbose):
        _run(cfg, out_dir, server_app, client_mods)
    path = out_dir / "summary.json"
    if not path.is_file():
        raise RuntimeError(f"the run wrote no {path}; see the log above for the server's error")
    return path


def _run(cfg: Experiment, out_dir: Path, server_app: ServerApp | None, client_mods: list | None) -> None:
    flower_engine.install(cfg.engine_poll_s)  # one scan per pass instead of one per node (1,000 clients)
    run_simulation(
        server_app=server_app or make_server_app(cfg, out_dir),
        # the simulated clients hold the experiment's privacy group themselves: no
        # message can loosen it (a deployed SuperNode reads its own node config)
        client_app=make_client_app(ClientPolicy.for_simulation(cfg), client_mods),
        num_supernodes=cfg.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": RAY_INIT_ARGS},
    )


log = logging.getLogger(__name__)
FAILED_FILE, TIMING_FILE = "failed.json", "timing.json"
_failures: list[dict[str, Any]] = []  # this process's failed runs (a multirun runs them all here)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sweep_size(argv: list[str]) -> int:
    """How many runs ``-m`` makes of these command-line overrides (Hydra's own parser)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    size = 1
    for o in overrides:
        if o.is_sweep_override():
            size *= len(list(o.sweep_string_iterator()))
    return size


def _progress(hc: Any, status: str, wall: float) -> None:
    """One line per finished run of a sweep: how far it is."""
    if hc.mode is not RunMode.MULTIRUN:
        return
    done = int(hc.job.num) + 1
    total = sweep_size(sys.argv[1:])
    log.info("[sweep %d/%d] %s in %.1f s: %s", done, total, status, wall, " ".join(hc.overrides.task) or "(no overrides)")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> str | None:
    """One Hydra job. Never raises an ordinary error: a failure is written to failed.json,
    logged, and remembered, so Hydra goes on with the next combination of a sweep."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    job = {"overrides": overrides, "job_num": hc.job.get("num"), "output_dir": str(out_dir)}
    started, t0 = _now(), time.perf_counter()
    try:
        check_fresh_run_dir(out_dir)
        path = simulate(to_plain(cfg), out_dir)
    except DirtyRunDir as exc:  # nothing may be written there: it is another run's
        _failures.append({**job, "status": "refused", "error_type": type(exc).__name__, "message": str(exc)})
        log.error("RUN REFUSED [%s] %s", " ".join(overrides) or "(no overrides)", exc)
        return None
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # SystemExit: a library calling sys.exit must not end the sweep
        wall = round(time.perf_counter() - t0, 3)
        if isinstance(exc, KeyboardInterrupt):  # a second signal, or one before our handler: the server thread stops too
            STOP.set()
        interrupted = STOP.is_set()
        status = "interrupted" if interrupted else "failed"
        write_failure(out_dir, exc, status, **job, started=started, wall_time_s=wall)
        failure = {**job, "status": status, "error_type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        _write_json(out_dir / TIMING_FILE, {"status": status, "started": started, "finished": _now(), "wall_time_s": wall})
        _failures.append(failure)
        if interrupted:
            log.error("RUN INTERRUPTED [%s] after %.1f s (written to %s); the sweep stops here",
                      " ".join(overrides) or "(no overrides)", wall, out_dir / FAILED_FILE)
            raise KeyboardInterrupt from None
        log.error(
            "RUN FAILED [%s] %s: %s\n%s  (written to %s)",
            " ".join(overrides) or "(no overrides)", type(exc).__name__, exc, failure["traceback"], out_dir / FAILED_FILE,
        )
        _progress(hc, "failed", wall)
        return None
    wall = round(time.perf_counter() - t0, 3)
    _write_json(out_dir / TIMING_FILE, {"status": "ok", "started": started, "finished": _now(), "wall_time_s": wall})
    _progress(hc, "ok", wall)
    print(path, flush=True)
    return str(path)


def _on_signal(signum: int, _frame: Any) -> None:
    """First SIGINT/SIGTERM: stop the run at the server's next wait (well within 30 s)
    and record it as interrupted; a second one aborts at once."""
    if STOP.is_set():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    STOP.set()
    log.warning("%s received: stopping the run (send it again to abort at once)", signal.Signals(signum).name)


def cli() -> int:
    """Run main() (one run, or every combination with -m); 1 if any run failed, 130 if
    a signal stopped it."""
    _failures.clear()
    STOP.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        main()
    except KeyboardInterrupt:
        print(f"interrupted: {len(_failures)} run(s) did not finish; see failed.json in their directories", file=sys.stderr, flush=True)
        return 130
    if not _failures:
        return 0
    lines = [f"{len(_failures)} run(s) failed:"]
    lines += [f"  {f['output_dir']}  [{' '.join(f['overrides'])}]  {f['error_type']}: {f['message']}" for f in _failures]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(cli())
