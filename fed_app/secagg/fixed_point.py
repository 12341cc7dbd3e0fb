"""Floats <-> fixed point in the ring Z_2^64 (numpy uint64 wraps, so sums are mod 2^64).

A value v travels as round(v * 2^f) in two's complement. Each client clips its values
to +-bound with ``bound * 2^f * n <= 2^62``, so the sum of n clients never wraps and
decodes exactly; NaN and infinity cannot be encoded at all.
"""

from __future__ import annotations

import numpy as np

HEADROOM_BITS = 62  # sums stay below 2^62 in magnitude: decoding is unambiguous


class EncodingError(ValueError):
    """A value that has no fixed-point encoding (NaN, infinity)."""


def bound(fraction_bits: int, participants: int) -> float:
    """The largest magnitude one of ``participants`` clients may contribute per entry."""
    return float(2 ** (HEADROOM_BITS - fraction_bits)) / max(participants, 1)


def encode(values: np.ndarray, fraction_bits: int, participants: int) -> tuple[np.ndarray, int]:
    """``values`` as uint64 fixed point, and how many entries were clipped to the bound."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise EncodingError(f"{int((~np.isfinite(v)).sum())} value(s) are NaN or infinite: a statistic must be finite to be summed")
    b = bound(fraction_bits, participants)
    clipped = int((np.abs(v) > b).sum())
    fixed = np.rint(np.clip(v, -b, b) * 2.0**fraction_bits).astype(np.int64)
    return fixed.view(np.uint64), clipped


def decode(total: np.ndarray, fraction_bits: int) -> np.ndarray:
    """A sum of encodings back to floats."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**fraction_bits
