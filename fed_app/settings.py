"""What the server tells clients: a flat ConfigRecord built from the Experiment, and a
client's typed parse of it.

Clients never read Hydra. The server flattens the sections clients need into dotted
keys (``train.lr``, ``index.m``, ...); a client rebuilds the tree and checks it against
the same schema (``fed_app.experiment``) before it touches its shard: a config that
does not parse is refused, whoever sent it. A data set or partition is only ever one
of the schema's loaders, so a message cannot make a client call an arbitrary function.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord

from .experiment import ClientView, ConfigError, Experiment, SearchRequest, Shared, parse
from .privacy.policy import Refusal


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
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parents)} is both a value and a section")
        node[leaf] = value
    return tree


def client_config(exp: Experiment) -> ConfigRecord:
    """The ConfigRecord every train/evaluate/query message carries."""
    return ConfigRecord(flatten(exp.model_dump(by_alias=True, exclude_none=True, include=set(Shared.model_fields))))


def received_config(record: ConfigRecord) -> ClientView:
    """A message's config as this client's typed view; refused if it does not parse."""
    try:
        return parse(ClientView, unflatten(dict(record.items())), what="server's config")
    except ConfigError as e:
        raise Refusal("config", f"the config the server sent is refused: {e}") from None


def search_request(record: ConfigRecord) -> SearchRequest:
    try:
        return parse(SearchRequest, unflatten(dict(record.items())), what="search request")
    except ConfigError as e:
        raise Refusal("config", f"the search request is refused: {e}") from None


def client_view(exp: Experiment, **extra: Any) -> ClientView:
    """What a client receives for ``exp`` (plus per-message keys such as
    ``server-round``): the same path as over the network."""
    record = client_config(exp)
    for key, value in extra.items():
        record[key] = value
    return received_config(record)
