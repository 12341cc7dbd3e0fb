"""Search a running federation: queries from a .npy file, merged answers to a file.

    flwr run . <federation> --run-config 'mode="search" queries="/abs/q.npy"
        results="/abs/hits.npz" k=10 rerank=100'   # or radius=0.5 for range search

Every shard answers from its persisted store (encoded with the last global model it
received); the server writes the merged, node-qualified hits with ``np.savez``.
"""

from __future__ import annotations

import json
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from vector_index.datasets import load_npy_file

from .federated_search import QueryRefused, SearchResults, search_federation


def save_results(res: SearchResults, path: Path) -> Path:
    """``.npz`` with distances, ids, nodes (and lims for range search); a JSON sidecar
    names the shards that answered and those that did not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"distances": res.distances, "ids": res.ids, "nodes": res.nodes}
    if res.lims is not None:
        arrays["lims"] = res.lims
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    info = {
        "answered": res.answered,
        "missing": res.missing,
        "refused": {str(n): why for n, why in res.refused.items()},
        "model_versions": {str(n): v for n, v in res.model_versions.items()},
    }
    write_sidecar(path, info)
    return path


def write_sidecar(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))


def run_search(grid: Grid, run_config: dict, timeout: float) -> Path:
    queries = load_npy_file(str(run_config["queries"]), name="queries")
    out = Path(str(run_config.get("results", "search_results.npz"))).expanduser().resolve()
    radius = float(run_config.get("radius", 0.0))
    k = int(run_config.get("k", 10))
    rerank = int(run_config.get("rerank", 0))
    ranged = radius != 0  # 0: top-k; a radius out of range is refused by the request's schema
    try:
        res = search_federation(grid, queries, ConfigRecord({}), timeout, k=None if ranged else k,
                                radius=radius if ranged else None, rerank=rerank)
    except QueryRefused as exc:  # no hits to write; the sidecar says who refused and why
        write_sidecar(out, {"answered": [], "missing": exc.missing, "refused": {str(n): why for n, why in exc.refused.items()}})
        log(ERROR, "search: %s", exc)
        raise
    log(INFO, "search: %d queries answered by %d shard(s); missing %s; refused %s",
        queries.shape[0], len(res.answered), res.missing or "none", res.refused or "none")
    return save_results(res, out)
