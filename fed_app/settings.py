"""What the server tells clients: a flat ConfigRecord built from the composed config.

Clients never read Hydra. The server flattens the parts they need into dotted keys
(``train.lr``, ``index.m``, ...) and clients rebuild a nested dict from them.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord

CLIENT_SECTIONS = ("data", "partition", "index", "model", "train", "init", "eval", "strategy")

# Functions a client may be asked to call to load its simulated shard: a ConfigRecord
# comes from the network, so a client never instantiates an arbitrary ``_target_``.
ALLOWED_TARGET_PREFIXES = ("vector_index.datasets.", "vector_index.partition.")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is not None:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def client_config(cfg: dict[str, Any]) -> ConfigRecord:
    """The ConfigRecord every train/evaluate/query message carries."""
    tree = {k: cfg[k] for k in CLIENT_SECTIONS if k in cfg}
    tree["num_clients"] = cfg["num_clients"]
    tree["seed"] = cfg["seed"]
    return ConfigRecord(flatten(tree))


def received_config(record: ConfigRecord) -> dict[str, Any]:
    return unflatten(dict(record.items()))


def check_target(spec: dict[str, Any]) -> None:
    target = str(spec.get("_target_", ""))
    if not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise ValueError(f"refusing to call {target!r}: not a fedvec data loader or partitioner")
