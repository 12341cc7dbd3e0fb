"""The shared torch encoder and its local training objective.

The encoder is linear (affine, or an orthogonal rotation) and starts at the identity, so
with lambda = gamma = 0 nothing moves it and fedvec is plain PQ on the raw vectors. Being
linear, a deployed shard applies it inside faiss (a LinearTransform), queries included.

Task loss (no labels needed): distance preservation within a mini-batch,
``mean_ij (||z_i - z_j||^2 - ||x_i - x_j||^2)^2``. It is zero at the identity and keeps
neighbourhoods where they were while the PQ term pulls z towards codewords (a learned,
OPQ-like transform when the encoder is linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from .experiment import ENCODER_KINDS


class Encoder(nn.Module):
    """``affine``: z = A x + b. ``rotation``: z = R x with R orthogonal (torch's
    parametrization keeps it orthogonal through FedAvg of its parameters), i.e. an
    OPQ-style rotation learned by gradient descent. Both start at the identity."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"encoder kind {kind!r} must be one of {ENCODER_KINDS}")
        self.linear = nn.Linear(dim, dim, bias=kind == "affine")
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            if self.linear.bias is not None:
                self.linear.bias.zero_()
        if kind == "rotation":
            orthogonal(self.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


ROTATION_KEY = "linear.parametrizations.weight.original"


def initial_weights(dim: int, kind: str) -> dict[str, np.ndarray]:
    return weights_of(Encoder(dim, kind))


def weights_of(model: Encoder) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_encoder(weights: dict[str, np.ndarray], reuse: dict[tuple[str, int], Encoder] | None = None) -> Encoder:
    """A module holding ``weights``. With ``reuse``, the module kept there for this kind
    and size is loaded instead of building one (building the orthogonal parametrization
    costs more than a client's training step); the caller owns it until its next call."""
    kind = "rotation" if ROTATION_KEY in weights else "affine"
    dim = int(np.shape(weights[ROTATION_KEY if kind == "rotation" else "linear.weight"])[0])
    if reuse is None:
        model = Encoder(dim, kind)
    else:
        if (kind, dim) not in reuse:
            reuse[(kind, dim)] = Encoder(dim, kind)
        model = reuse[(kind, dim)]
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
    return model


_AFFINE: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # encoder digest -> (A, b), this process's last few models


def affine_of(weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with z = A x + b: what a faiss LinearTransform needs to encode in a shard.

    Building the torch module (an orthogonal parametrization for a rotation) costs more
    than a client's whole Lloyd step at 100 vectors, so it is done once per model."""
    from .state import arrays_digest

    key = arrays_digest(weights)
    pair = _AFFINE.pop(key, None) or _affine_of(weights)
    _AFFINE[key] = pair  # most recent last: each client's one-off trained weights do not evict the global model
    if len(_AFFINE) > 4:
        _AFFINE.pop(next(iter(_AFFINE)))
    a, b = pair
    return a.copy(), b.copy()


_READ: dict[tuple[str, int], Encoder] = {}  # kept modules for reading (A, b): the server reads one per client reply
_TRAIN: dict[tuple[str, int], Encoder] = {}  # kept modules for local training (one client at a time per process)


@torch.no_grad()
def _affine_of(weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lin = load_encoder(weights, reuse=_READ).linear
    a = lin.weight.detach().numpy().astype(np.float32)
    b = lin.bias.detach().numpy() if lin.bias is not None else np.zeros(a.shape[0])
    return np.ascontiguousarray(a), b.astype(np.float32)


@torch.no_grad()
def encode_weights(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """``encode(load_encoder(weights), x)`` without building the module: the same
    ``F.linear`` on the same (A, b), read once per model (see :func:`affine_of`)."""
    a, b = affine_of(weights)
    bias = None if ROTATION_KEY in weights else torch.from_numpy(b)
    z = torch.nn.functional.linear(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(a), bias)
    return np.ascontiguousarray(z.numpy(), dtype=np.float32)


@torch.no_grad()
def encode(model: Encoder, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.ascontiguousarray(model(torch.from_numpy(np.ascontiguousarray(x))).numpy(), dtype=np.float32)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    lam: float  # weight of the PQ distortion term
    gamma: float  # weight of the L1 term
    proximal_mu: float  # FedProx term; 0 for FedAvg
    seed: int


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances without a sqrt (whose gradient is NaN at zero)."""
    sq = (x * x).sum(dim=1)
    return sq[:, None] + sq[None, :] - 2 * x @ x.T


def _quantize(z: torch.Tensor, codebooks: list) -> torch.Tensor:
    """q(z) under the global (fixed) codebooks, coarse first; no gradient flows into q.

    A faiss additive quantizer (RQ/LSQ) encodes with its own beam or local search, as
    the shard will: q is a constant here, so it needs no torch version."""
    with torch.no_grad():
        base = torch.zeros_like(z)
        for cb in codebooks:
            if not isinstance(cb, torch.Tensor):
                r = np.ascontiguousarray((z - base).detach().numpy(), dtype=np.float32)
                base = base + torch.from_numpy(cb.decode(cb.compute_codes(r)))
                continue
            m, _, dsub = cb.shape
            r = (z - base).reshape(z.shape[0], m, dsub).transpose(0, 1)  # [M, B, dsub]
            assign = torch.cdist(r, cb).argmin(dim=2)  # [M, B]
            q = torch.gather(cb, 1, assign[..., None].expand(-1, -1, dsub))
            base = base + q.transpose(0, 1).reshape(z.shape)
    return base


def train_encoder(
    weights: dict[str, np.ndarray], x: np.ndarray, codebooks: list, s: TrainSettings
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Local epochs of the joint objective; returns new weights and mean loss terms.

    ``codebooks``: per level, a ``[M, K, dsub]`` array or a faiss additive quantizer."""
    model = load_encoder(weights, reuse=_TRAIN)
    model.train()
    start = [p.detach().clone() for p in model.parameters()]
    cbs = [torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)) if isinstance(c, np.ndarray) else c for c in codebooks]
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    totals = {"task_loss": 0.0, "pq_loss": 0.0, "l1_loss": 0.0}
    steps = 0
    for _ in range(s.epochs):
        for batch in torch.randperm(xt.shape[0], generator=gen).split(s.batch_size):
            xb = xt[batch]
            z = model(xb)
            task = ((_sq_dists(z) - _sq_dists(xb)) ** 2).mean()
            pq = ((z - _quantize(z, cbs)) ** 2).sum(dim=1).mean() if cbs else z.new_zeros(())
            l1 = z.abs().sum(dim=1).mean()
            loss = task + s.lam * pq + s.gamma * l1
            if s.proximal_mu > 0:
                loss = loss + s.proximal_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start))
            opt.zero_grad()
            loss.backward()
            opt.step()
            totals["task_loss"] += task.item()
            totals["pq_loss"] += pq.item()
            totals["l1_loss"] += l1.item()
            steps += 1
    return weights_of(model), {k: v / max(steps, 1) for k, v in totals.items()}
