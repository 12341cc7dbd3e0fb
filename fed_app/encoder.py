"""The shared torch encoder and its local training objective.

``z = A x + b + W2 relu(W1 x)`` starts at the identity (A = I, b = 0, W2 = 0), so with
lambda = gamma = 0 nothing moves it and fedvec is plain PQ on the raw vectors.

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


class Encoder(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()
        self.hidden = hidden
        if hidden > 0:
            self.up = nn.Linear(dim, hidden)
            self.down = nn.Linear(hidden, dim, bias=False)
            nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        if self.hidden > 0:
            z = z + self.down(torch.relu(self.up(x)))
        return z


def initial_weights(dim: int, hidden: int, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return weights_of(Encoder(dim, hidden))


def weights_of(model: Encoder) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_encoder(weights: dict[str, np.ndarray]) -> Encoder:
    dim = weights["linear.weight"].shape[0]
    hidden = weights["up.weight"].shape[0] if "up.weight" in weights else 0
    model = Encoder(dim, hidden)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
    return model


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


def _quantize(z: torch.Tensor, codebooks: list[torch.Tensor]) -> torch.Tensor:
    """q(z) under the global (fixed) codebooks, coarse first; no gradient flows into q."""
    with torch.no_grad():
        base = torch.zeros_like(z)
        for cb in codebooks:
            m, _, dsub = cb.shape
            r = (z - base).reshape(z.shape[0], m, dsub).transpose(0, 1)  # [M, B, dsub]
            assign = torch.cdist(r, cb).argmin(dim=2)  # [M, B]
            q = torch.gather(cb, 1, assign[..., None].expand(-1, -1, dsub))
            base = base + q.transpose(0, 1).reshape(z.shape)
    return base


def train_encoder(
    weights: dict[str, np.ndarray], x: np.ndarray, codebooks: list[np.ndarray], s: TrainSettings
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Local epochs of the joint objective; returns new weights and mean loss terms."""
    model = load_encoder(weights)
    model.train()
    start = [p.detach().clone() for p in model.parameters()]
    cbs = [torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)) for c in codebooks]
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
            totals["task_loss"] += float(task)
            totals["pq_loss"] += float(pq)
            totals["l1_loss"] += float(l1)
            steps += 1
    return weights_of(model), {k: v / max(steps, 1) for k, v in totals.items()}
