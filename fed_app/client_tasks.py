"""What a client does with its shard, as plain functions on arrays (no Flower here).

``client_app.py`` unpacks messages, calls these, and packs the replies. The strategy's
``codebook_update`` mode (sent in every message's config) says what a client returns:
``lloyd`` statistics, ``average_refined`` / ``average_independent`` centroids, nothing
for ``none`` (the one-shot init alone) and ``local`` (each shard keeps its own codebook).
"""

from __future__ import annotations

import faiss
import numpy as np

from vector_index import additive
from vector_index.quantizers import IndexSpec, additive_quantizer, build_index, residuals, squared_errors, train_additive
from vector_index.topk import recall_report
from vector_index.validation import ADDITIVE_KINDS

from . import lloyd
from .experiment import ClientView, Shared
from .encoder import TrainSettings, encode_weights, train_encoder
from .privacy import release
from .privacy.policy import ClientPolicy
from .state import GlobalState


def level_input(z: np.ndarray, level: str, codebooks: dict[str, np.ndarray]) -> np.ndarray:
    """The vectors a codebook level quantizes: z for coarse, residuals of z for PQ."""
    if level == "pq" and "coarse" in codebooks:
        return residuals(z, codebooks["coarse"])
    return z


def train_local_codebooks(
    z: np.ndarray, spec: IndexSpec, iters: int, seed: int, min_count: int | None = None
) -> dict[str, np.ndarray]:
    """Codebooks trained on this shard alone (faiss k-means per sub-space), coarse first.

    A shard with fewer vectors than centroids repeats centroids to fill the codebook.
    With ``min_count`` (a codebook that leaves the client) every centroid supported by
    fewer vectors is replaced by a copy of a supported one.
    """
    books: dict[str, np.ndarray] = {}
    if spec.kind in ADDITIVE_KINDS:  # faiss RQ/LSQ training (min_count: refused by validation, see fed_app.config)
        return {spec.kind: train_additive(spec, z, seed)}
    for level in spec.levels:
        m, k, _ = spec.level_shape(level, z.shape[1])
        zl = level_input(z, level, books)
        cents, counts = lloyd.local_centroids(zl, m, k, iters, seed)
        if min_count is not None:  # released: each centroid must be the mean of its cell
            cents, counts = cell_means(zl, cents)
        idx = np.resize(np.arange(cents.shape[1]), k)
        cents, counts = cents[:, idx], counts[:, idx]
        books[level] = cents if min_count is None else release.fill_unsupported(cents, counts, min_count)
    return books


def cell_means(z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each centroid replaced by the mean of the vectors it is assigned, and their counts.

    k-means returns centroids whose last update may predate the final assignment (with
    few or zero iterations they are sampled raw vectors); only a cell's own mean over
    its count vectors is what min-count then vouches for. Empty cells come back as 0.
    """
    sums, counts, _ = lloyd.lloyd_statistics(z, centroids)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[..., None] > 0, sums / np.maximum(counts, 1)[..., None], 0.0)
    return means.astype(np.float32), counts


def shard_codebooks(state: GlobalState, x: np.ndarray, spec: IndexSpec, cfg: Shared) -> dict[str, np.ndarray]:
    """The codebooks this shard encodes with: the global ones, or (local mode) its own,
    trained on its vectors encoded with the current global encoder."""
    if cfg.codebook_update == "local":
        z = encode_weights(state.encoder, x)
        return train_local_codebooks(z, spec, cfg.init.kmeans_iters, cfg.seed)
    return {level: state.codebooks[level] for level in spec.levels}


def init_centroids(state: GlobalState, x: np.ndarray, level: str, cfg: Shared, policy: ClientPolicy) -> dict[str, np.ndarray]:
    """One-shot init, client side: local k-means per sub-space, centroids + counts.

    Only centroids supported by ``min_count`` vectors leave; a small shard asks for at
    most ``n // min_count`` of them, and their counts (the server's weights) are rounded.
    """
    z = encode_weights(state.encoder, x)
    spec = cfg.index.spec
    m, k, _ = spec.level_shape(level, z.shape[1])
    local_k = release.init_k(x.shape[0], k if level == "coarse" else cfg.init.local_k, policy.min_count)
    zl = level_input(z, level, state.codebooks)
    cents, _ = lloyd.local_centroids(zl, m, local_k, cfg.init.kmeans_iters, cfg.seed)
    cents, counts = cell_means(zl, cents)
    cents, counts = release.supported_centroids(cents, counts, policy.min_count)
    return {"centroids": cents, "counts": policy.round_counts(counts).astype(np.int32)}


def codebook_update(
    z: np.ndarray, books: dict[str, np.ndarray], spec: IndexSpec, cfg: ClientView, policy: ClientPolicy
) -> tuple[dict[str, np.ndarray], int]:
    """What the server needs to move the global codebooks, keyed ``<level>.<what>``,
    and how many small cells were withheld."""
    mode = cfg.codebook_update
    seed = cfg.seed
    if mode in ("none", "local"):
        return {}, 0
    if mode == "average_independent":
        own = train_local_codebooks(z, spec, cfg.init.kmeans_iters, seed + (cfg.server_round or 0), policy.min_count)
        return {f"{level}.centroids": c for level, c in own.items()}, 0
    update: dict[str, np.ndarray] = {}
    withheld = 0
    for level in spec.levels:
        zl = level_input(z, level, books)
        if mode == "lloyd":
            sums, counts = level_statistics(zl, level, books, spec, cfg.server_round or 1)
            sums, counts, small = release.suppress_small_cells(sums, counts, policy.min_count)
            withheld += small
            update[f"{level}.sums"] = sums.astype(np.float32)
            update[f"{level}.counts"] = counts.astype(np.int32)
        elif mode == "average_refined":
            iters = cfg.strategy.flower.local_iters  # the schema requires it for average_refined
            refined, counts = lloyd.local_refinement(zl, books[level], iters, seed)
            update[f"{level}.centroids"] = release.keep_unsupported_at(books[level], refined, counts, policy.min_count)
            withheld += int((counts < policy.min_count).sum())
        else:
            raise ValueError(f"unknown codebook_update mode {mode!r}")
    return update, withheld


def level_statistics(
    zl: np.ndarray, level: str, books: dict[str, np.ndarray], spec: IndexSpec, server_round: int, clip=None
) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd step's sums and counts for ``level``, rows clipped by ``clip`` (DP) first.

    PQ and coarse levels: per sub-space cell of the level's input. Additive levels: per
    codeword of this round's codebook (:func:`additive.round_plan`), either of the
    residuals the stages before it leave (a greedy RQ stage, as faiss trains) or of the
    targets all other codebooks leave under faiss's own encoding (a block update).
    """
    if level not in ADDITIVE_KINDS:
        sums, counts, _ = lloyd.lloyd_statistics(zl if clip is None else clip(zl), books[level])
        return sums, counts
    book = books[level]
    stage, greedy = additive.round_plan(server_round, book.shape[0], spec.stage_rounds)
    if greedy:
        r = additive.rq_residuals(zl, book[:stage], spec.beam_size)
        sums, counts, _ = additive.rq_stage_statistics(r if clip is None else clip(r), book[stage])
        return sums[None], counts[None]
    aq = additive_quantizer(spec, book)
    codes = additive.unpack_codes(aq, aq.compute_codes(zl))
    targets = additive.block_targets(zl, book, codes, stage)
    return additive.block_statistics(targets if clip is None else clip(targets), codes[:, stage], book.shape[1])


def train(
    state: GlobalState, x: np.ndarray, cfg: ClientView, policy: ClientPolicy
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Train the encoder locally, then compute this strategy's codebook update.

    Returns (encoder weights, codebook update arrays, metrics).
    """
    release.check_shard_size(x.shape[0], policy.min_count)
    spec = cfg.index.spec
    t = cfg.train
    settings = TrainSettings(
        epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, lam=t.lam, gamma=t.gamma,
        proximal_mu=cfg.proximal_mu or 0.0, seed=cfg.seed * 100_003 + (cfg.server_round or 0),
    )
    books = shard_codebooks(state, x, spec, cfg)
    quantizers = [additive_quantizer(spec, books[lvl]) if lvl in ADDITIVE_KINDS else books[lvl] for lvl in spec.levels]
    weights, losses = train_encoder(state.encoder, x, quantizers, settings)
    z = encode_weights(weights, x)
    update, withheld = codebook_update(z, books, spec, cfg, policy)
    metrics = {"num-examples": policy.round_examples(x.shape[0]), "cells-withheld": float(withheld), **losses}
    return weights, update, metrics


ESTIMATE_KEYS = ("recall_1_at_1", "recall_1_at_10", "recall_10_at_10")


def evaluate(state: GlobalState, x: np.ndarray, ids: np.ndarray, cfg: Shared, policy: ClientPolicy) -> dict[str, float]:
    """The shard's privacy-safe evaluation: aggregates over all its vectors only.

    - mean ||z - q(z)||^2 and ||z||^2 (weighted by num-examples they average to the union);
    - its own recall estimate: a held-out sample of its vectors queries the compressed
      index of the others, scored against exact search on them, all locally.
    """
    release.check_shard_size(x.shape[0], policy.min_count)
    spec = cfg.index.spec
    z = encode_weights(state.encoder, x)
    books = shard_codebooks(state, x, spec, cfg)
    sse = float(squared_errors(z, books, spec).sum()) if books else 0.0
    n = x.shape[0]
    out = {
        "num-examples": policy.round_examples(n),
        "distortion": sse / n,
        "energy": float((z.astype(np.float64) ** 2).sum()) / n,
    }
    out.update(local_recall(z, x, ids, books, spec, cfg, policy))
    return out


def local_recall(
    z: np.ndarray, x: np.ndarray, ids: np.ndarray, books: dict[str, np.ndarray], spec: IndexSpec, cfg: Shared, policy: ClientPolicy
) -> dict[str, float]:
    """Recall of this shard's compressed index on a held-out sample of its own vectors.

    ``estimate.queries`` is 0 (and the recalls 0) when the shard is too small to hold
    out ``min_count`` queries and still have k vectors to search.
    """
    k = cfg.eval.k
    n = x.shape[0]
    nq = min(cfg.eval.local_queries, n // 2)
    if nq < policy.min_count or n - nq < k:
        return {"estimate.queries": 0.0, **{f"estimate.{key}": 0.0 for key in ESTIMATE_KEYS}}
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(cfg.seed).choice(n, nq, replace=False)] = True
    index = build_index(spec, z[~held], ids[~held], books)
    _, found = index.search(z[held], k)
    exact = faiss.IndexIDMap(faiss.IndexFlatL2(x.shape[1]))
    exact.add_with_ids(x[~held], ids[~held])
    _, truth = exact.search(x[held], k)
    report = recall_report(found, truth)
    return {"estimate.queries": policy.round_examples(nq), **{f"estimate.{key}": report[key] for key in ESTIMATE_KEYS}}


def search(state: GlobalState, x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, cfg: Shared) -> dict[str, np.ndarray]:
    """Local top-k of every query: from the compressed index and exactly on raw vectors.

    Only ids and distances leave the client.
    """
    spec = cfg.index.spec
    z, zq = encode_weights(state.encoder, x), encode_weights(state.encoder, queries)
    index = build_index(spec, z, ids, shard_codebooks(state, x, spec, cfg))
    dc, ic = index.search(zq, k)
    exact = faiss.IndexIDMap(faiss.IndexFlatL2(x.shape[1]))
    exact.add_with_ids(x, ids)
    de, ie = exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return {"compressed.distances": dc, "compressed.ids": ic, "exact.distances": de, "exact.ids": ie}
