"""The server side of secure aggregation: from masked inputs and revealed shares to
the sum of the survivors' inputs, and nothing more (pure functions, no Flower)."""

from __future__ import annotations

import math

import numpy as np

from . import keys, shamir


class Aborted(RuntimeError):
    """The session cannot produce a sum (too few clients left); the reason says why."""


def threshold_for(n: int, fraction: float) -> int:
    """t for a roster of n: the configured fraction, and always more than half."""
    return max(math.ceil(fraction * n), n // 2 + 1)


def unmask_sum(
    session: str,
    roster: list[int],
    s_public: list[bytes],
    threshold: int,
    masked: dict[int, np.ndarray],
    revealed: dict[int, list[tuple[int, str, bytes]]],
    dropped: list[int],
) -> np.ndarray:
    """Sum of the inputs behind ``masked`` (uint64, mod 2^64).

    ``revealed[holder]`` are the shares a survivor sent; ``dropped`` shared keys but
    sent no masked input: their pairwise masks are rebuilt from their mask keys.
    """
    survivors = sorted(masked)
    if len(revealed) < threshold:
        raise Aborted(f"only {len(revealed)} client(s) sent their unmasking shares, below the threshold {threshold}")
    b_shares: dict[int, list[bytes]] = {u: [] for u in survivors}
    s_shares: dict[int, list[bytes]] = {v: [] for v in dropped}
    for holder in sorted(revealed):
        for peer, kind, share in revealed[holder]:
            target = b_shares if kind == "b" else s_shares
            if peer in target:
                target[peer].append(share)
    total = np.zeros(next(iter(masked.values())).size, dtype=np.uint64)
    for u in survivors:
        total += masked[u]
    weights: dict[tuple[int, ...], list[int]] = {}

    def recover(shares: list[bytes], whose: str) -> bytes:
        if len(shares) < threshold:
            raise Aborted(f"only {len(shares)} share(s) of {whose} arrived, below the threshold {threshold}")
        use = shares[:threshold]
        xs = tuple(shamir.parse(s)[0] for s in use)
        if xs not in weights:
            weights[xs] = shamir.lagrange_at_zero(list(xs))
        return shamir.combine(use, weights=weights[xs])

    for u in survivors:
        total -= keys.prg(recover(b_shares[u], f"node {u}'s self-mask"), total.size)
    for v in dropped:
        s_secret = recover(s_shares[v], f"dropped node {v}'s mask key")
        for u in survivors:
            seed = keys.agree(s_secret, s_public[roster.index(u)], session, keys.MASK_LABEL)
            if u < v:  # u added +PRG(s_uv) for a peer above it, -PRG below
                total -= keys.prg(seed, total.size)
            else:
                total += keys.prg(seed, total.size)
    return total
