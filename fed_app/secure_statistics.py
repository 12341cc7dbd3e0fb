"""What a client contributes to a secure sum, and what the server makes of the sum.

Every statistic is a sum over clients, so secure aggregation can hide each client's
part. Without DP (``privacy=secagg``) a client sends what the plain protocol sends, as
sums: Lloyd sums and counts, n_k * w_k and n_k for the encoder (the server's FedAvg /
FedAdam step then runs on the average), n_k * centroids for the averaging baselines.

With DP (``privacy=secure``) each array has an L2 sensitivity to one vector:

- Lloyd sums of vectors clipped to norm C: C; counts: sqrt(M) (one cell per sub-space);
  an additive level (RQ/LSQ) sends one codebook's cells per round, of targets clipped
  to C: C and 1;
- the rotation encoder moves by federated Procrustes (an over-relaxed OPQ step): the
  client sends sum_i q_i x_i^T with q_i, x_i clipped to C (sensitivity C^2) and the
  server takes the orthogonal polar factor. A gradient-trained encoder update has no per-vector bound
  short of its whole clip, and DP-FedAvg noise on it at 10-50 clients swamps it;
- evaluation: sums of distortion and energy clipped to C^2, and the count of vectors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vector_index.quantizers import reconstruct, squared_errors

from . import client_tasks
from .encoder import ROTATION_KEY, encode_weights, load_encoder, weights_of
from .experiment import ClientView, Shared
from .privacy import dp
from .privacy.policy import ClientPolicy, Refusal

LOSS_KEYS = ("task_loss", "pq_loss", "l1_loss")


def train_statistics(state, x: np.ndarray, cfg: ClientView, policy: ClientPolicy) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(arrays to sum, their sensitivities); sensitivities are 0 without DP."""
    if policy.dp_epsilon > 0:
        return _dp_train(state, x, cfg, policy)
    weights, update, metrics = client_tasks.train(state, x, cfg, policy)
    n = float(x.shape[0])
    stats: dict[str, np.ndarray] = {"clients": np.ones(1), "examples": np.array([n])}
    for key, v in update.items():
        stats[f"codebook.{key}"] = v.astype(np.float64) * (n if key.endswith(".centroids") else 1.0)
    for key, w in weights.items():
        stats[f"encoder.{key}"] = w.astype(np.float64) * n
    for key in LOSS_KEYS:
        stats[f"loss.{key}"] = np.array([metrics[key] * n])
    stats["cells-withheld"] = np.array([metrics["cells-withheld"]])
    return stats, {k: 0.0 for k in stats}


def _dp_train(state, x: np.ndarray, cfg: ClientView, policy: ClientPolicy) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    mode = cfg.codebook_update
    if mode.startswith("average"):
        raise Refusal(
            "dp-epsilon",
            f"codebook_update={mode} sends locally trained codebooks, which one vector can move without bound: "
            "no DP guarantee is possible; run this baseline with privacy=secagg",
        )
    learn_encoder = cfg.train.lam > 0
    if learn_encoder and ROTATION_KEY not in state.encoder:
        raise Refusal("dp-epsilon", "under DP the encoder moves by federated Procrustes, which needs model=rotation (or train.lam=0)")
    spec = cfg.index.spec
    c = policy.dp_clip
    books = client_tasks.shard_codebooks(state, x, spec, cfg)
    z = encode_weights(state.encoder, x)
    stats: dict[str, np.ndarray] = {"clients": np.ones(1)}
    sens: dict[str, float] = {"clients": 0.0}
    if mode == "lloyd":
        for level in spec.levels:
            zl = client_tasks.level_input(z, level, books)
            sums, counts = client_tasks.level_statistics(zl, level, books, spec, cfg.server_round or 1, clip=lambda v: dp.clip_rows(v, c))
            stats[f"codebook.{level}.sums"], sens[f"codebook.{level}.sums"] = sums, c
            stats[f"codebook.{level}.counts"], sens[f"codebook.{level}.counts"] = counts.astype(np.float64), math.sqrt(counts.shape[0])
    if learn_encoder and books:
        q = reconstruct(z, books, spec)
        stats["encoder.cross"] = dp.clip_rows(q, c).astype(np.float64).T @ dp.clip_rows(x, c).astype(np.float64)
        sens["encoder.cross"] = c * c
    return stats, sens


def evaluate_statistics(state, x: np.ndarray, ids: np.ndarray, cfg: Shared, policy: ClientPolicy) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    spec = cfg.index.spec
    z = encode_weights(state.encoder, x)
    books = client_tasks.shard_codebooks(state, x, spec, cfg)
    err = squared_errors(z, books, spec) if books else np.zeros(x.shape[0])
    energy = (z.astype(np.float64) ** 2).sum(axis=1)
    if policy.dp_epsilon > 0:
        c2 = policy.dp_clip**2
        stats = {"distortion": np.array([np.minimum(err, c2).sum()]), "energy": np.array([np.minimum(energy, c2).sum()]), "examples": np.array([float(x.shape[0])])}
        return stats, {"distortion": c2, "energy": c2, "examples": 1.0}
    stats = {"distortion": np.array([err.sum()]), "energy": np.array([energy.sum()]), "examples": np.array([float(x.shape[0])])}
    est = client_tasks.local_recall(z, x, ids, books, spec, cfg, policy)
    nq = float(est["estimate.queries"])
    stats["estimate.queries"] = np.array([nq])
    for key in client_tasks.ESTIMATE_KEYS:
        stats[f"estimate.{key}"] = np.array([est[f"estimate.{key}"] * nq])
    return stats, {k: 0.0 for k in stats}


def procrustes(cross: np.ndarray) -> np.ndarray:
    """The rotation R maximising tr(R^T sum q x^T): argmin sum ||R x - q||^2 (OPQ's step)."""
    u, _, vt = np.linalg.svd(cross.astype(np.float64))
    return (u @ vt).astype(np.float32)


def relaxed_procrustes(cross: np.ndarray, current: np.ndarray, step: float) -> np.ndarray:
    """An over-relaxed Procrustes step: the rotation nearest ``R + step (P - R)``, P the
    Procrustes solution. One exact step per round moves R only a little from where the
    assignments were made (q is close to R x), and ten of them stay near PQ; stepping
    past P (step 4, measured on GloVe) recovers much of what more OPQ iterations would."""
    p = procrustes(cross).astype(np.float64)
    if step == 1.0:
        return p.astype(np.float32)
    r = current.astype(np.float64)
    return procrustes(r + step * (p - r))


def rotation_weights(encoder: dict[str, np.ndarray], rotation: np.ndarray) -> dict[str, np.ndarray]:
    """The rotation encoder's torch weights holding ``rotation``."""
    model = load_encoder(encoder)
    with torch.no_grad():
        model.linear.weight = torch.from_numpy(np.ascontiguousarray(rotation))
    return weights_of(model)


def evaluate_metrics(total: dict[str, np.ndarray]) -> dict[str, float]:
    """The evaluation MetricRecord from the secure sum (a noisy count can go below 1)."""
    n = max(float(total["examples"][0]), 1.0)
    out = {"num-examples": n, "distortion": float(total["distortion"][0]) / n, "energy": float(total["energy"][0]) / n}
    if "estimate.queries" in total:
        nq = float(total["estimate.queries"][0])
        out["estimate.queries"] = nq
        if nq > 0:
            out.update({f"estimate.{k}": float(total[f"estimate.{k}"][0]) / nq for k in client_tasks.ESTIMATE_KEYS})
    return out
