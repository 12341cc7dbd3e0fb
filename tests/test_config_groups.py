"""Every option of every config group composes and reaches the client intact.

The ConfigRecord goes through Flower's own protobuf serialisation (what travels to a
SuperNode), then through the ClientApp's unpacking; the client must read back exactly
the composed values, and be able to act on them (index spec, codebook mode, loaders).
"""

from __future__ import annotations

import pytest
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord
from hydra.utils import instantiate

from fed_app.client_tasks import codebook_mode, index_spec
from fed_app.config import CONF_DIR, ConfigError, compose_config, validate
from fed_app.settings import CLIENT_SECTIONS, check_target, client_config, flatten, received_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
NPY_OVERRIDES = ["data.path=/nonexistent/only-composed.npy"]


def _over_the_wire(cfg: dict) -> dict:
    wire = ProtoConfigRecord()
    wire.ParseFromString(config_record_to_proto(client_config(cfg)).SerializeToString())
    return received_config(config_record_from_proto(wire))


def test_every_group_has_options() -> None:
    assert {"data", "partition", "index", "strategy", "model"} <= set(GROUPS)
    assert {"fedlloyd", "fedprox", "fedadam", "fedyogi", "init_only", "avg_refined", "avg_independent", "local_only"} <= {
        o for g, o in OPTIONS if g == "strategy"
    }
    assert {"flat", "pq", "ivfpq", "hnsw", "hnswpq", "opqpq"} <= {o for g, o in OPTIONS if g == "index"}
    assert {"iid", "dirichlet", "by_cluster"} <= {o for g, o in OPTIONS if g == "partition"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_reaches_client(group: str, option: str) -> None:
    extra = NPY_OVERRIDES if (group, option) == ("data", "npy") else []
    cfg = compose_config([f"{group}={option}", "num_clients=7", "train.lam=2.5", *extra])
    got = _over_the_wire(cfg)

    sent = {k: cfg[k] for k in CLIENT_SECTIONS}
    assert flatten({k: got[k] for k in CLIENT_SECTIONS}) == flatten(sent)
    assert got["num_clients"] == 7 and got["train"]["lam"] == 2.5
    if group in ("data", "partition"):
        check_target(got[group])  # the client accepts the loader it is told to call
        assert got[group]["_target_"] == cfg[group]["_target_"]
    if group == "index":
        assert index_spec(got).kind == cfg["index"]["kind"]
    if group == "strategy":
        assert codebook_mode(got) == cfg["strategy"]["flower"]["codebook_update"]


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "strategy"])
def test_strategy_instantiates(option: str) -> None:
    cfg = compose_config([f"strategy={option}"])
    strategy = instantiate(cfg["strategy"]["flower"], min_available_nodes=2)
    assert strategy.codebook_update == cfg["strategy"]["flower"]["codebook_update"]
    assert type(strategy).__name__ == cfg["strategy"]["flower"]["_target_"].rsplit(".", 1)[1]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["index.m=3"], "index.m"),
        (["index.nbits=17"], "index.nbits"),
        (["num_clients=0"], "num_clients"),
        (["num_clients=200001"], "num_clients"),
        (["fraction_train=0"], "fraction_train"),
        (["fraction_train=1.5"], "fraction_train"),
        (["partition=dirichlet", "partition.alpha=-0.1"], "partition.alpha"),
        (["index=opqpq", "model=affine"], "model"),
        (["index=hnsw", "index.ef_search=5"], "index.ef_search"),
    ],
)
def test_invalid_config_names_key(overrides: list[str], key: str) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate(cfg, dim=50, num_vectors=100_000)
