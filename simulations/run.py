"""One experiment (or a sweep with -m) in-process with Flower's simulation engine.

    python -m simulations.run num_rounds=5 partition=dirichlet
    python -m simulations.run -m strategy=fedlloyd,avg_refined num_clients=10,50
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from flwr.simulation import run_simulation
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fed_app.client_app import app as client_app
from fed_app.config import CONF_DIR, to_plain, validate
from fed_app.local_data import load_dataset
from fed_app.server_app import make_server_app


def simulate(cfg: dict, out_dir: Path) -> Path:
    """Run the ServerApp and ClientApps in this process; returns summary.json's path."""
    logging.getLogger("flwr").propagate = False  # Hydra's root handler would print twice
    data = load_dataset(cfg["data"])  # cached: the in-process ServerApp reuses it
    validate(cfg, data.base.shape[1], data.base.shape[0])  # refuse before any client starts
    run_simulation(
        server_app=make_server_app(cfg, out_dir),
        client_app=client_app,
        num_supernodes=int(cfg["num_clients"]),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": "ERROR", "log_to_driver": True}},
    )
    path = out_dir / "summary.json"
    if not path.is_file():
        raise RuntimeError(f"the run wrote no {path}; see the log above for the server's error")
    return path


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    print(simulate(to_plain(cfg), out_dir), flush=True)


if __name__ == "__main__":
    main()
