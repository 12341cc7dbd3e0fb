"""Write an experiment's partitions as per-organisation vector files, for trying a
deployment on one machine (each SuperNode then imports its own file into a shard).

    python -m simulations.export_shards runs/demo num_clients=3
    # -> runs/demo/org-1.npy, org-1-ids.npy, ..., queries.npy

Uses the same Hydra config as a run (``data``, ``partition``, ``num_clients``); ids
are the rows' global positions, so they are disjoint across organisations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fed_app.config import compose_config, load_experiment
from fed_app.local_data import client_shard, load_dataset


def export(out: Path, overrides: list[str]) -> list[Path]:
    cfg = load_experiment(compose_config(overrides))
    out.mkdir(parents=True, exist_ok=True)
    n = cfg.num_clients
    written = []
    for pid in range(n):
        x, ids = client_shard(cfg, pid, n)
        np.save(out / f"org-{pid + 1}.npy", x)
        np.save(out / f"org-{pid + 1}-ids.npy", ids)
        written.append(out / f"org-{pid + 1}.npy")
    np.save(out / "queries.npy", load_dataset(cfg.data).queries)
    return written


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    for path in export(Path(argv[0]), argv[1:]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
