"""The centralized reference on disk, so a sweep trains it once per data, index and seed.

Training faiss on the pooled data is the slowest part of an ``index=opqpq`` run and the
same in every run of a sweep over strategies or privacy settings. The key hashes what
the reference depends on: the base and query vectors, the true neighbours, the index
spec, k, the seed and the faiss version. ``summary.json`` says whether the figure was
trained in the run or read from the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from logging import WARNING
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from flwr.supercore import log

TRAINED = "faiss trained on the pooled data in this run"


def reference_key(spec: dict, arrays: tuple[np.ndarray, ...], k: int, seed: int, code: str = "") -> str:
    """``code``: the source of the training function, so a change to it is a cache miss."""
    h = hashlib.sha256(json.dumps({"index": spec, "k": k, "seed": seed, "faiss": faiss.__version__, "code": code},
                                  sort_keys=True).encode())
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:32]


def _valid(metrics: object) -> bool:
    return isinstance(metrics, dict) and bool(metrics) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in metrics.values())


def cached_reference(cache_dir: Path | None, key: str, compute: Callable[[], dict[str, float]]) -> dict:
    """The reference metrics with their ``source``: read from ``cache_dir/<key>.json``, or
    computed and stored there (atomically). No cache dir: always computed."""
    path = cache_dir / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            metrics = None
        if _valid(metrics):
            return {**metrics, "source": f"cache {path} (faiss trained on the same pooled data, index and seed by an earlier run)"}
        log(WARNING, "eval.reference_cache: %s is unreadable; training the reference again", path)
    metrics = compute()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(metrics))
            os.replace(tmp, path)
        except OSError as exc:
            log(WARNING, "eval.reference_cache: cannot write %s (%s); the reference is not cached", path, exc)
    return {**metrics, "source": TRAINED}
