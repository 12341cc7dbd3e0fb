"""Every option of every config group composes and reaches the client intact.

The ConfigRecord goes through Flower's own protobuf serialisation (what travels to a
SuperNode), then through the ClientApp's unpacking; the client must read back exactly
the composed values, and be able to act on them (index spec, codebook mode, loaders).
"""

from __future__ import annotations

import copy

import pytest
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord
from hydra.utils import instantiate

from fed_app.config import CONF_DIR, ConfigError, compose_config, load_experiment, validate
from fed_app.experiment import ClientView, Experiment, Shared
from fed_app.privacy.policy import Refusal
from fed_app.settings import client_config, flatten, received_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
NPY_OVERRIDES = ["data.path=/nonexistent/only-composed.npy"]


def _over_the_wire(exp: Experiment) -> ClientView:
    wire = ProtoConfigRecord()
    wire.ParseFromString(config_record_to_proto(client_config(exp)).SerializeToString())
    return received_config(config_record_from_proto(wire))


def _shared(view: Shared) -> dict:
    return view.model_dump(by_alias=True, exclude_none=True, include=set(Shared.model_fields))


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
    exp = load_experiment(cfg)  # every key of the option is in the schema (unknown keys are refused)
    exp = exp.model_copy(update={"index": exp.index.resolved(50)})  # m=auto: as the server resolves it for GloVe
    got = _over_the_wire(exp)

    assert _shared(got) == _shared(exp)
    sent = {k: v for k, v in cfg.items() if k in Shared.model_fields}
    if sent["index"].get("m") == "auto":
        sent["index"]["m"] = 10
    assert flatten(_shared(got)) == flatten(sent)
    assert got.num_clients == 7 and got.train.lam == 2.5
    if group in ("data", "partition"):
        assert getattr(got, group).target == cfg[group]["_target_"]
    if group == "index":
        assert got.index.spec.kind == cfg["index"]["kind"]
    if group == "strategy":
        assert got.codebook_update == cfg["strategy"]["flower"]["codebook_update"]


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "strategy"])
def test_strategy_instantiates(option: str) -> None:
    cfg = compose_config([f"strategy={option}"])
    strategy = instantiate(load_experiment(cfg).strategy.flower.kwargs(), min_available_nodes=2)
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


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _wrong(value: object) -> object:
    """A value of the wrong type for ``value``'s key."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "abc"
    return "often" if value == "auto" else 12345  # index.m: a number or "auto"


DEFAULT = compose_config([])  # composed once; each test changes a deep copy
DEFAULT_LEAVES = [(k, v) for k, v in _leaves(DEFAULT) if v is not None]


@pytest.mark.parametrize(("key", "value"), DEFAULT_LEAVES, ids=[k for k, _ in DEFAULT_LEAVES])
def test_every_key_is_typed_and_a_wrong_type_is_named(key: str, value: object) -> None:
    """Every key of the default experiment: a value of the wrong type is refused before
    anything runs, by an error that starts with the key."""
    cfg = copy.deepcopy(DEFAULT)
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = _wrong(value)
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}[.:]"):
        load_experiment(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=abc"], r"^train\.lr: must be a number, got 'abc'"),
        (["train.local_epochs=-1"], r"^train\.local_epochs: must be >= 0, got -1"),
        (["eval.every=0"], r"^eval\.every: "),
        (["init.local_k=0"], r"^init\.local_k: "),
        (["seed=-1"], r"^seed: "),
        (["num_rounds=1.5"], r"^num_rounds: must be an integer, got 1[.]5"),
        (["timeout_s=inf"], r"^timeout_s: must be a finite number, got inf"),
        (["train.lam=true"], r"^train\.lam: must be a number, got True"),
        (["+train.lrr=0.1"], r"^train\.lrr: not a key of the config"),
        (["+index.nlist=4"], r"^index\.nlist: not a key of index=pq"),
        (["~train.lr"], r"^train\.lr: missing"),
        (["data._target_=os.system"], r"^data\._target_: 'os\.system' is not one of"),
        (["+strategy.flower.beta=0.1"], r"^strategy\.flower\.beta: FederatedPQ does not take it"),
        (["strategy=avg_refined", "~strategy.flower.local_iters"], r"^strategy\.flower\.local_iters: codebook_update=average_refined needs it"),
        (["+privacy.max_kk=3"], r"^privacy\.max_kk: not a privacy setting"),
        (["privacy.dp_epsilon=-1"], r"^privacy\.dp_epsilon: must be a number >= 0"),
        (["min_clients=11"], r"^min_clients: must be in 1\.\.num_clients=10"),
    ],
)
def test_schema_refuses_with_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(compose_config(overrides))


def test_client_refuses_a_config_outside_the_schema() -> None:
    """The client parses what the server sends with the same schema: a value out of range,
    an unknown key or a loader outside the schema is refused, naming the key."""
    good = client_config(validate(compose_config([]), dim=50, num_vectors=100_000))
    for key, value, named in [("train.lr", -1.0, "train.lr"), ("train.lrr", 0.1, "train.lrr"),
                              ("data._target_", "os.system", "data._target_"), ("server-round", -3, "server-round")]:
        record = type(good)(dict(good.items()))
        record[key] = value
        with pytest.raises(Refusal, match=rf"the config the server sent is refused: {key.replace('.', '[.]')}") as exc:
            received_config(record)
        assert exc.value.limit == "config" and named in exc.value.reason


@pytest.mark.parametrize(("dim", "m"), [(50, 10), (16, 4), (128, 32), (768, 128), (7, 1), (1, 1)])
def test_m_auto_picks_a_divisor_near_five_dimensions_per_subspace(dim, m):
    exp = validate(compose_config(["data=synthetic", f"data.dim={dim}"]), dim=dim, num_vectors=3000, num_public=300)
    assert exp.index.m == m and dim % m == 0
    assert exp.as_dict()["index"]["m"] == m  # summary.json records the value used


def test_the_client_refuses_an_unresolved_m_auto():
    record = client_config(load_experiment(compose_config([])))
    assert record["index.m"] == "auto"
    with pytest.raises(Refusal, match=r"index\.m: auto must be resolved by the server"):
        received_config(record)


def test_too_few_public_vectors_for_the_codebook_is_refused_before_any_client_starts():
    with pytest.raises(ConfigError, match=r"^init\.source: public init: 200 public vectors \(the held-out data\.num_queries\) cannot seed 256 centroids"):
        validate(compose_config(["data=synthetic", "data.num_queries=200"]), dim=16, num_vectors=3000, num_public=200)
