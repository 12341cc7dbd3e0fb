"""fedvec ServerApp for ``flwr run .``: compose ``conf/`` with Hydra, run, report.

Hydra overrides arrive through Flower's run config as one string::

    flwr run . --run-config 'overrides="num_rounds=3 partition=dirichlet"'
    flwr run . <federation> --run-config 'mode="search" queries="/abs/q.npy" k=10'
"""

from __future__ import annotations

import time
from logging import ERROR
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .config import compose_config, load_experiment
from .experiment import Experiment
from .federation import run_federation
from .interrupts import Interrupted, StoppableGrid
from .quiet_log import quiet_flower
from .search_mode import run_search
from .summary import DirtyRunDir, write_failure


def make_server_app(cfg: Experiment, out_dir: Path) -> ServerApp:
    """A ServerApp closed over an already composed config (used by simulations.run)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(StoppableGrid(grid), cfg, out_dir)  # type: ignore[arg-type]  # a SIGINT/SIGTERM ends every wait

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_experiment(compose_config(str(rc.get("overrides", ""))))
    mode = str(rc.get("mode", "train"))
    if mode not in ("train", "search"):
        raise ValueError(f"run config mode={mode!r}: use \"train\" or \"search\"")
    if mode == "search":
        print(run_search(StoppableGrid(grid), dict(rc), cfg.timeout_s), flush=True)  # type: ignore[arg-type]  # its 0.2 s pull, not the grid's 3 s
        return
    out_dir = Path(str(rc.get("output-dir", "outputs"))).expanduser().resolve() / time.strftime("%Y-%m-%d/%H-%M-%S")
    try:
        with quiet_flower(cfg.verbose):
            print(run_federation(StoppableGrid(grid), cfg, out_dir), flush=True)  # type: ignore[arg-type]
    except DirtyRunDir:
        raise  # another run's directory: write nothing there
    except Exception as exc:
        path = write_failure(out_dir, exc, "interrupted" if isinstance(exc, Interrupted) else "failed", overrides=str(rc.get("overrides", "")))
        log(ERROR, "fedvec: RUN FAILED: %s: %s (written to %s)", type(exc).__name__, exc, path)
        raise  # Flower marks the run finished:failed (`flwr ls --run-id <id>`; scripts/flwr-run.sh exits 1)
