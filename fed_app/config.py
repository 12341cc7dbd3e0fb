"""Compose ``conf/`` with Hydra (for ``flwr run .``) and refuse invalid experiments.

Validation runs on the server before any client is contacted, naming the key at fault.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .privacy.policy import ClientPolicy

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


INDEX_KINDS = ("flat", "pq", "ivfpq", "hnsw", "hnswpq", "opqpq")
EVAL_PROTOCOLS = ("private", "trusted")
INIT_SOURCES = ("clients", "public")


class ConfigError(ValueError):
    """An experiment configuration fedvec refuses to run."""


# key -> (type, smallest, largest): checked first, so a wrong type is named, not a traceback
# (None: unbounded; int values pass for float keys; bool never passes for a number; a
# float key's smallest value is excluded, except for the keys in INCLUSIVE)
SCALARS: dict[str, tuple[type, float | None, float | None]] = {
    "num_clients": (int, 1, None), "num_rounds": (int, 1, None), "min_clients": (int, 1, None), "seed": (int, 0, 2**31 - 1),
    "fraction_train": (float, 0, 1), "timeout_s": (float, 0, None), "nodes_wait_s": (float, 0, None),
    "data.num_base": (int, 1, None), "data.num_queries": (int, 1, None),
    "train.local_epochs": (int, 0, None), "train.batch_size": (int, 2, None), "train.lr": (float, 0, None),
    "train.lam": (float, 0, None), "train.gamma": (float, 0, None), "train.procrustes_step": (float, 0, None),
    "init.local_k": (int, 1, None), "init.kmeans_iters": (int, 1, None),
    "eval.k": (int, 10, None), "eval.local_queries": (int, 1, None), "eval.every": (int, 1, None),
}
INCLUSIVE = ("train.lam", "train.gamma")


def check_scalars(cfg: dict[str, Any]) -> None:
    """Type and range of every scalar key in SCALARS that the config holds."""
    for key, (kind, lo, hi) in SCALARS.items():
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None and key.startswith("data."):
            continue  # a data loader without this key (npy files)
        ok_type = not isinstance(node, bool) and (isinstance(node, int) if kind is int else isinstance(node, (int, float)))
        closed = kind is int or key in INCLUSIVE
        bounds = f"{'>= ' if closed else '> '}{lo}" if hi is None else f"in {'[' if closed else '('}{lo}, {hi}]"
        what = "an integer " if kind is int else ("" if ok_type else "a number ")
        if not ok_type or (lo is not None and (node < lo or (not closed and node == lo))) or (hi is not None and node > hi):
            raise ConfigError(f"{key}: must be {what}{bounds}, got {node!r}")


def compose_config(overrides: str | list[str] = ()) -> dict[str, Any]:
    """The same composition ``@hydra.main`` does, for callers outside Hydra's CLI."""
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_plain(cfg)


def to_plain(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def validate(cfg: dict[str, Any], dim: int, num_vectors: int) -> None:
    """Refuse what cannot work, before any client starts."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    check_scalars(cfg)
    need(cfg.get("resume") is None or isinstance(cfg["resume"], str), "resume", f"must be a run directory (or null), got {cfg.get('resume')!r}")

    n = cfg["num_clients"]
    need(isinstance(n, int) and n >= 1, "num_clients", f"must be an integer >= 1, got {n!r}")
    need(n <= num_vectors, "num_clients", f"{n} clients but only {num_vectors} base vectors")
    mc = cfg["min_clients"]
    need(isinstance(mc, int) and 1 <= mc <= n, "min_clients", f"must be an integer in 1..num_clients={n}, got {mc!r}")
    need(cfg["timeout_s"] > 0, "timeout_s", f"must be > 0, got {cfg['timeout_s']}")
    need(cfg["num_rounds"] >= 1, "num_rounds", f"must be >= 1, got {cfg['num_rounds']}")
    f = cfg["fraction_train"]
    need(0 < f <= 1, "fraction_train", f"must be in (0, 1], got {f}")
    alpha = cfg["partition"].get("alpha")
    need(alpha is None or alpha > 0, "partition.alpha", f"must be > 0, got {alpha}")
    idx = cfg["index"]
    need(idx["kind"] in INDEX_KINDS, "index.kind", f"{idx['kind']!r} is not one of {', '.join(INDEX_KINDS)}")
    if idx["kind"] in ("pq", "ivfpq", "hnswpq", "opqpq"):
        m, nbits = idx["m"], idx["nbits"]
        need(m >= 1, "index.m", f"must be >= 1, got {m}")
        need(dim % m == 0, "index.m", f"the vectors' dimension {dim} is not divisible by M={m}")
        need(1 <= nbits <= 16, "index.nbits", f"must be in 1..16, got {nbits}")
        need(num_vectors >= 1 << nbits, "index.nbits", f"2^{nbits} centroids but only {num_vectors} vectors")
    if idx["kind"] == "ivfpq":
        need(1 <= idx["nlist"] <= num_vectors, "index.nlist", f"must be in 1..{num_vectors}, got {idx['nlist']}")
        need(idx["nprobe"] >= 1, "index.nprobe", f"must be >= 1, got {idx['nprobe']}")
    if idx["kind"] == "opqpq":
        need(cfg["model"]["kind"] == "rotation", "model", "index=opqpq needs model=rotation (the OPQ rotation is the encoder)")
    if idx["kind"] in ("hnsw", "hnswpq"):
        need(idx["hnsw_m"] >= 2, "index.hnsw_m", f"must be >= 2, got {idx['hnsw_m']}")
        need(idx["ef_search"] >= cfg["eval"]["k"], "index.ef_search", f"must be >= eval.k={cfg['eval']['k']}, got {idx['ef_search']}")
    t = cfg["train"]
    need(t["local_epochs"] >= 0, "train.local_epochs", "must be >= 0")
    need(t["batch_size"] >= 2, "train.batch_size", "must be >= 2 (the task loss uses pairs)")
    need(t["lr"] > 0, "train.lr", "must be > 0")
    need(t["lam"] >= 0 and t["gamma"] >= 0, "train.lam/train.gamma", "loss weights must be >= 0")
    need(t["procrustes_step"] > 0, "train.procrustes_step", f"must be > 0 (1: the plain Procrustes step), got {t['procrustes_step']}")
    ev = cfg["eval"]
    need(ev["k"] >= 10, "eval.k", "must be >= 10 to report 10-recall@10")
    need(ev["protocol"] in EVAL_PROTOCOLS, "eval.protocol", f"{ev['protocol']!r} is not one of {', '.join(EVAL_PROTOCOLS)}")
    need(isinstance(ev["local_queries"], int) and ev["local_queries"] >= 1, "eval.local_queries", f"must be an integer >= 1, got {ev['local_queries']!r}")
    need(isinstance(cfg["init"]["kmeans_iters"], int) and cfg["init"]["kmeans_iters"] >= 1, "init.kmeans_iters", f"must be an integer >= 1, got {cfg['init']['kmeans_iters']!r}")
    need(cfg["init"]["source"] in INIT_SOURCES, "init.source", f"{cfg['init']['source']!r} is not one of {', '.join(INIT_SOURCES)}")
    try:
        policy = ClientPolicy.from_mapping(cfg["privacy"], source="privacy group")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    need(ev["k"] <= num_vectors, "eval.k", f"{ev['k']} neighbours asked of {num_vectors} base vectors")
    if ev["protocol"] == "trusted":  # under the private protocol k never leaves a shard
        need(ev["k"] <= policy.max_k, "eval.k", f"{ev['k']} exceeds privacy.max_k={policy.max_k}: the clients would refuse it")
    mode = cfg["strategy"]["flower"]["codebook_update"]
    f_krum = cfg["strategy"]["flower"].get("num_malicious_nodes")
    if f_krum is not None:
        sampled = max(1, math.floor(n * cfg["fraction_train"]))
        need(isinstance(f_krum, int) and f_krum >= 0 and sampled > 2 * f_krum + 2, "strategy.flower.num_malicious_nodes",
             f"Krum tolerates f hostile clients only among n > 2f + 2 sampled clients; got f={f_krum!r} with {sampled} sampled per round")
    if policy.secure_aggregation:
        need(
            cfg["init"]["source"] == "public" or mode == "local", "init.source",
            "clients (k-FED) sends each shard's own centroids, which secure aggregation cannot sum; use init.source=public, or privacy=trusted",
        )
        need(not cfg["strategy"].get("robust", False), "strategy",
             f"{cfg['strategy']['name']} aggregates each client's encoder robustly, which secure aggregation hides (the server sees only the sum); "
             "run it with privacy=trusted, or use fedlloyd")
        need(n >= policy.secagg_min_clients, "num_clients", f"{n} clients are fewer than privacy.secagg_min_clients={policy.secagg_min_clients}: no client would mask its statistics in so small a sum")
    if policy.dp:
        need(not mode.startswith("average"), "strategy",
             f"{cfg['strategy']['name']} averages locally trained codebooks, which one vector can move without bound: no DP guarantee; run it with privacy=secagg")
        need(t["lam"] == 0 or cfg["model"]["kind"] == "rotation", "model",
             "under DP the encoder moves by federated Procrustes on clipped sums, which needs model=rotation (or train.lam=0)")
        releases = cfg["num_rounds"] + 1
        need(releases <= policy.dp_max_releases, "num_rounds",
             f"{cfg['num_rounds']} rounds + the final evaluation are {releases} noisy releases, but privacy.dp_max_releases={policy.dp_max_releases}: "
             "raise privacy.dp_max_releases (the same epsilon then buys less per release) or run fewer rounds")
