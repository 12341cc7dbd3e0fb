"""What a client does with its shard, as plain functions on arrays (no Flower here).

``client_app.py`` unpacks messages, calls these, and packs the replies. The strategy's
``codebook_update`` mode (sent in every message's config) says what a client returns:
``lloyd`` statistics, ``average_refined`` / ``average_independent`` centroids, nothing
for ``none`` (the one-shot init alone) and ``local`` (each shard keeps its own codebook).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import faiss
import numpy as np

from vector_index.quantizers import IndexSpec, build_index, residuals, squared_errors

from . import lloyd
from .encoder import TrainSettings, encode, load_encoder, train_encoder
from .state import GlobalState


def index_spec(cfg: dict[str, Any]) -> IndexSpec:
    """The ``index`` config group as an IndexSpec (keys it does not name keep defaults)."""
    known = {f.name for f in fields(IndexSpec)}
    return IndexSpec(**{k: v for k, v in cfg["index"].items() if k in known})


def codebook_mode(cfg: dict[str, Any]) -> str:
    return str(cfg["strategy"]["flower"]["codebook_update"])


def _level_input(z: np.ndarray, level: str, codebooks: dict[str, np.ndarray]) -> np.ndarray:
    """The vectors a codebook level quantizes: z for coarse, residuals of z for PQ."""
    if level == "pq" and "coarse" in codebooks:
        return residuals(z, codebooks["coarse"])
    return z


def train_local_codebooks(z: np.ndarray, spec: IndexSpec, iters: int, seed: int) -> dict[str, np.ndarray]:
    """Codebooks trained on this shard alone (faiss k-means per sub-space), coarse first.

    A shard with fewer vectors than centroids repeats centroids to fill the codebook.
    """
    books: dict[str, np.ndarray] = {}
    for level in spec.levels:
        m, k, _ = spec.level_shape(level, z.shape[1])
        cents, _ = lloyd.local_centroids(_level_input(z, level, books), m, k, iters, seed)
        books[level] = cents[:, np.resize(np.arange(cents.shape[1]), k)]
    return books


def shard_codebooks(state: GlobalState, x: np.ndarray, spec: IndexSpec, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """The codebooks this shard encodes with: the global ones, or (local mode) its own,
    trained on its vectors encoded with the current global encoder."""
    if codebook_mode(cfg) == "local":
        z = encode(load_encoder(state.encoder), x)
        return train_local_codebooks(z, spec, int(cfg["init"]["kmeans_iters"]), int(cfg["seed"]))
    return {level: state.codebooks[level] for level in spec.levels}


def init_centroids(state: GlobalState, x: np.ndarray, level: str, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """One-shot init, client side: local k-means per sub-space, centroids + counts."""
    z = encode(load_encoder(state.encoder), x)
    spec = index_spec(cfg)
    m, k, _ = spec.level_shape(level, z.shape[1])
    local_k = k if level == "coarse" else int(cfg["init"]["local_k"])
    cents, counts = lloyd.local_centroids(
        _level_input(z, level, state.codebooks), m, local_k, int(cfg["init"]["kmeans_iters"]), int(cfg["seed"])
    )
    return {"centroids": cents, "counts": counts.astype(np.int32)}


def codebook_update(z: np.ndarray, books: dict[str, np.ndarray], spec: IndexSpec, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """What the server needs to move the global codebooks, keyed ``<level>.<what>``."""
    mode = codebook_mode(cfg)
    seed = int(cfg["seed"])
    if mode in ("none", "local"):
        return {}
    if mode == "average_independent":
        own = train_local_codebooks(z, spec, int(cfg["init"]["kmeans_iters"]), seed + int(cfg["server-round"]))
        return {f"{level}.centroids": c for level, c in own.items()}
    update: dict[str, np.ndarray] = {}
    for level in spec.levels:
        zl = _level_input(z, level, books)
        if mode == "lloyd":
            sums, counts, _ = lloyd.lloyd_statistics(zl, books[level])
            update[f"{level}.sums"] = sums.astype(np.float32)
            update[f"{level}.counts"] = counts.astype(np.int32)
        elif mode == "average_refined":
            iters = int(cfg["strategy"]["flower"]["local_iters"])
            update[f"{level}.centroids"] = lloyd.local_refinement(zl, books[level], iters, seed)
        else:
            raise ValueError(f"unknown codebook_update mode {mode!r}")
    return update


def train(state: GlobalState, x: np.ndarray, cfg: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Train the encoder locally, then compute this strategy's codebook update.

    Returns (encoder weights, codebook update arrays, metrics).
    """
    spec = index_spec(cfg)
    t = cfg["train"]
    settings = TrainSettings(
        epochs=int(t["local_epochs"]),
        batch_size=int(t["batch_size"]),
        lr=float(t["lr"]),
        lam=float(t["lam"]),
        gamma=float(t["gamma"]),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        seed=int(cfg["seed"]) * 100_003 + int(cfg["server-round"]),
    )
    books = shard_codebooks(state, x, spec, cfg)
    weights, losses = train_encoder(state.encoder, x, [books[lvl] for lvl in spec.levels], settings)
    z = encode(load_encoder(weights), x)
    return weights, codebook_update(z, books, spec, cfg), {"num-examples": float(x.shape[0]), **losses}


def distortion(state: GlobalState, x: np.ndarray, cfg: dict[str, Any]) -> dict[str, float]:
    """Mean ||z - q(z)||^2 and ||z||^2 over the shard; FedAvg's weighting by
    num-examples turns them into exact means over the union."""
    spec = index_spec(cfg)
    z = encode(load_encoder(state.encoder), x)
    books = shard_codebooks(state, x, spec, cfg)
    sse = float(squared_errors(z, books).sum()) if books else 0.0
    n = x.shape[0]
    return {"num-examples": float(n), "distortion": sse / n, "energy": float((z.astype(np.float64) ** 2).sum()) / n}


def search(state: GlobalState, x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Local top-k of every query: from the compressed index and exactly on raw vectors.

    Only ids and distances leave the client.
    """
    spec = index_spec(cfg)
    model = load_encoder(state.encoder)
    z, zq = encode(model, x), encode(model, queries)
    index = build_index(spec, z, ids, shard_codebooks(state, x, spec, cfg))
    dc, ic = index.search(zq, k)
    exact = faiss.IndexIDMap(faiss.IndexFlatL2(x.shape[1]))
    exact.add_with_ids(x, ids)
    de, ie = exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return {"compressed.distances": dc, "compressed.ids": ic, "exact.distances": de, "exact.ids": ie}
