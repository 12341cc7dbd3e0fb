"""Compose ``conf/`` with Hydra (for ``flwr run .``) and refuse invalid experiments.

The schema (``fed_app.experiment``) checks every key's type and range; :func:`validate`
adds what depends on the data and on several groups at once. Both run on the server
before any client is contacted, and name the key at fault.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vector_index.validation import ADDITIVE_KINDS

from .experiment import ConfigError, Experiment, parse

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: str | list[str] = ()) -> dict[str, Any]:
    """The same composition ``@hydra.main`` does, for callers outside Hydra's CLI."""
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_plain(cfg)


def to_plain(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def load_experiment(cfg: dict[str, Any] | Experiment) -> Experiment:
    """The composed config as a typed Experiment: every key's type and range checked."""
    return cfg if isinstance(cfg, Experiment) else parse(Experiment, cfg)


def validate(cfg: dict[str, Any] | Experiment, dim: int, num_vectors: int, num_public: int | None = None) -> Experiment:
    """Refuse what cannot work, before any client starts: the schema first, then what
    depends on the data's shape and on several groups together. Returns the experiment
    with what depends on the data resolved (``index.m=auto``).

    ``num_public``: the server's public vectors for ``init.source=public`` (None: not known)."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    exp = load_experiment(cfg)
    exp = exp.model_copy(update={"index": exp.index.resolved(dim)})
    n = exp.num_clients
    need(n <= num_vectors, "num_clients", f"{n} clients but only {num_vectors} base vectors")
    idx = exp.index
    if idx.kind in ADDITIVE_KINDS:
        need(exp.init.source == "public" or exp.codebook_update == "local", "init.source",
             f"index={idx.kind}: its M full-dimensional codebooks start from faiss's {idx.kind.upper()} trained on public vectors "
             "(k-FED merges per-sub-space centroids, which an additive quantizer does not have); use init.source=public")
        need(exp.codebook_update in ("lloyd", "none", "local"), "strategy",
             f"index={idx.kind} trains by exact federated block updates (codebook_update=lloyd); {exp.strategy.name} averages "
             "codebooks, and averaging additive codebooks trained apart means nothing; use fedlloyd, init_only or local_only")
    if idx.m is not None and idx.nbits is not None and idx.kind not in ADDITIVE_KINDS:
        need(dim % idx.m == 0, "index.m", f"the vectors' dimension {dim} is not divisible by M={idx.m}")
    if idx.m is not None and idx.nbits is not None:
        need(num_vectors >= 1 << idx.nbits, "index.nbits", f"2^{idx.nbits} centroids but only {num_vectors} vectors")
    if idx.nlist is not None:
        need(idx.nlist <= num_vectors, "index.nlist", f"must be in 1..{num_vectors}, got {idx.nlist}")
    if exp.init.source == "public" and num_public is not None and exp.codebook_update != "local":
        sizes = ([1 << idx.nbits] if idx.nbits is not None else []) + ([idx.nlist] if idx.nlist is not None else [])
        most = max(sizes, default=0)
        need(num_public >= most, "init.source",
             f"public init: {num_public} public vectors ({'init.public_path' if exp.init.public_path else 'the held-out data.num_queries'}) "
             f"cannot seed {most} centroids; raise data.num_queries, give init.public_path, or lower index.nbits")
    if idx.kind == "opqpq":
        need(exp.model.kind == "rotation", "model", "index=opqpq needs model=rotation (the OPQ rotation is the encoder)")
    if idx.ef_search is not None:
        need(idx.ef_search >= exp.eval.k, "index.ef_search", f"must be >= eval.k={exp.eval.k}, got {idx.ef_search}")
    policy = exp.privacy.limits
    need(exp.train.local_epochs <= policy.max_local_epochs, "train.local_epochs",
         f"{exp.train.local_epochs} exceeds privacy.max_local_epochs={policy.max_local_epochs}: the clients would refuse it")
    need(exp.init.kmeans_iters <= policy.max_kmeans_iters, "init.kmeans_iters",
         f"{exp.init.kmeans_iters} exceeds privacy.max_kmeans_iters={policy.max_kmeans_iters}: the clients would refuse it")
    need(exp.eval.k <= num_vectors, "eval.k", f"{exp.eval.k} neighbours asked of {num_vectors} base vectors")
    if exp.eval.protocol == "trusted":  # under the private protocol k never leaves a shard
        need(exp.eval.k <= policy.max_k, "eval.k", f"{exp.eval.k} exceeds privacy.max_k={policy.max_k}: the clients would refuse it")
    flower = exp.strategy.flower
    if flower.num_malicious_nodes is not None:
        f_krum = flower.num_malicious_nodes
        sampled = max(1, math.floor(n * exp.fraction_train))
        need(sampled > 2 * f_krum + 2, "strategy.flower.num_malicious_nodes",
             f"Krum tolerates f hostile clients only among n > 2f + 2 sampled clients; got f={f_krum!r} with {sampled} sampled per round")
    if policy.secure_aggregation:
        need(
            exp.init.source == "public" or flower.codebook_update == "local", "init.source",
            "clients (k-FED) sends each shard's own centroids, which secure aggregation cannot sum; use init.source=public, or privacy=trusted",
        )
        need(not exp.strategy.robust, "strategy",
             f"{exp.strategy.name} aggregates each client's encoder robustly, which secure aggregation hides (the server sees only the sum); "
             "run it with privacy=trusted, or use fedlloyd")
        need(n >= policy.secagg_min_clients, "num_clients", f"{n} clients are fewer than privacy.secagg_min_clients={policy.secagg_min_clients}: no client would mask its statistics in so small a sum")
    if policy.dp:
        need(not flower.codebook_update.startswith("average"), "strategy",
             f"{exp.strategy.name} averages locally trained codebooks, which one vector can move without bound: no DP guarantee; run it with privacy=secagg")
        need(exp.train.lam == 0 or exp.model.kind == "rotation", "model",
             "under DP the encoder moves by federated Procrustes on clipped sums, which needs model=rotation (or train.lam=0)")
        releases = exp.num_rounds + 1
        need(releases <= policy.dp_max_releases, "num_rounds",
             f"{exp.num_rounds} rounds + the final evaluation are {releases} noisy releases, but privacy.dp_max_releases={policy.dp_max_releases}: "
             "raise privacy.dp_max_releases (the same epsilon then buys less per release) or run fewer rounds")
    return exp
