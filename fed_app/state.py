"""The global model (encoder weights + codebooks) as one Flower ArrayRecord.

Keys are prefixed so a strategy can hand the encoder part to Flower's own
aggregation (FedAvg, FedProx, FedAdam) and treat codebooks separately.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord

ENCODER = "encoder."
CODEBOOK = "codebook."


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """A content key for a set of named arrays: one global model is checked and converted
    once per worker process, not once per client message (1,000 clients, one model)."""
    h = hashlib.sha1()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass
class GlobalState:
    encoder: dict[str, np.ndarray]
    codebooks: dict[str, np.ndarray] = field(default_factory=dict)  # "coarse", "pq"

    def to_record(self) -> ArrayRecord:
        items = {ENCODER + k: v for k, v in self.encoder.items()}
        items.update({CODEBOOK + k: v for k, v in self.codebooks.items()})
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in items.items()})

    @classmethod
    def from_record(cls, record: ArrayRecord) -> "GlobalState":
        arrays = {k: v.numpy() for k, v in record.items()}
        return cls(
            encoder={k[len(ENCODER):]: v for k, v in arrays.items() if k.startswith(ENCODER)},
            codebooks={k[len(CODEBOOK):]: v for k, v in arrays.items() if k.startswith(CODEBOOK)},
        )


def encoder_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({ENCODER + k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def record_of(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())
