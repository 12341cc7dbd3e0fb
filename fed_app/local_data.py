"""A simulated client's shard: its partition of the configured data set.

Each client rebuilds the same data set and partition from the seed it was sent, so no
vector travels; results are cached per process because Flower reuses workers. The
loader and the partitioner are the schema's (``fed_app.experiment``): never an arbitrary
``_target_`` from a message.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
from hydra.utils import instantiate

from vector_index.datasets import Dataset

from .experiment import Data, Partition, Shared, spec_of


@lru_cache(maxsize=2)
def _dataset(spec_json: str) -> Dataset:
    return instantiate(json.loads(spec_json))


@lru_cache(maxsize=4)
def _partitions(data_json: str, part_json: str, num_clients: int) -> tuple[np.ndarray, ...]:
    partition = instantiate(json.loads(part_json), _partial_=True)
    return tuple(partition(_dataset(data_json).base, num_clients))


def _key(section: Data | Partition) -> str:
    return json.dumps(spec_of(section), sort_keys=True)


def load_dataset(data: Data) -> Dataset:
    return _dataset(_key(data))


def client_partitions(cfg: Shared) -> tuple[np.ndarray, ...]:
    """Every simulated client's base row numbers (the simulator's view of the shards)."""
    return _partitions(_key(cfg.data), _key(cfg.partition), cfg.num_clients)


def client_shard(cfg: Shared, partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, global ids) of this client's partition."""
    if num_partitions != cfg.num_clients:
        raise ValueError(
            f"the federation runs {num_partitions} SuperNodes but the experiment wants "
            f"num_clients={cfg.num_clients}; make them equal"
        )
    ids = client_partitions(cfg)[partition_id]
    return _dataset(_key(cfg.data)).base[ids], ids
