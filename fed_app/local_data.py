"""A simulated client's shard: its partition of the configured data set.

Each client rebuilds the same data set and partition from the seed it was sent, so no
vector travels; results are cached per process because Flower reuses workers.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
from hydra.utils import instantiate

from vector_index.datasets import Dataset

from .settings import check_target


@lru_cache(maxsize=2)
def _dataset(spec_json: str) -> Dataset:
    spec = json.loads(spec_json)
    check_target(spec)
    return instantiate(spec)


@lru_cache(maxsize=4)
def _partitions(data_json: str, part_json: str, num_clients: int) -> tuple[np.ndarray, ...]:
    spec = json.loads(part_json)
    check_target(spec)
    partition = instantiate(spec, _partial_=True)
    return tuple(partition(_dataset(data_json).base, num_clients))


def load_dataset(data_spec: dict[str, Any]) -> Dataset:
    return _dataset(json.dumps(data_spec, sort_keys=True))


def client_partitions(cfg: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Every simulated client's base row numbers (the simulator's view of the shards)."""
    return _partitions(json.dumps(cfg["data"], sort_keys=True), json.dumps(cfg["partition"], sort_keys=True), int(cfg["num_clients"]))


def client_shard(cfg: dict[str, Any], partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, global ids) of this client's partition."""
    if num_partitions != cfg["num_clients"]:
        raise ValueError(
            f"the federation runs {num_partitions} SuperNodes but the experiment wants "
            f"num_clients={cfg['num_clients']}; make them equal"
        )
    data_json = json.dumps(cfg["data"], sort_keys=True)
    parts = _partitions(data_json, json.dumps(cfg["partition"], sort_keys=True), num_partitions)
    ids = parts[partition_id]
    return _dataset(data_json).base[ids], ids
