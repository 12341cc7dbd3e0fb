"""Vectors and ids from files: .npy, and the TEXMEX .fvecs/.ivecs of ANN benchmarks.

An .fvecs file is a sequence of records ``int32 d, float32[d]`` (.ivecs: ``int32[d]``);
all records must share d. Malformed files are reported, never partially read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import load_npy_file
from .validation import VectorError, check_vectors


def _read_vecs(path: Path, dtype: str, name: str) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % 4:
        raise VectorError(f"{name}: {str(path)!r} is not a valid {path.suffix} file ({size} bytes)")
    raw = np.fromfile(path, dtype="<i4")
    d = int(raw[0])
    if d < 1 or raw.size % (d + 1):
        raise VectorError(f"{name}: {str(path)!r} is not a valid {path.suffix} file "
                          f"(first record says d={d}, file holds {raw.size * 4} bytes)")
    rows = raw.reshape(-1, d + 1)
    bad = np.flatnonzero(rows[:, 0] != d)
    if bad.size:
        raise VectorError(f"{name}: {str(path)!r}: record {bad[0]} has dimension {rows[bad[0], 0]}, expected {d}")
    return np.ascontiguousarray(rows[:, 1:].view(dtype))


def read_vectors(path: str | Path, name: str = "vectors") -> np.ndarray:
    """float32 [n, d] from a .npy or .fvecs file, checked like any input vectors."""
    p = Path(path)
    if not p.is_file():
        raise VectorError(f"{name}: file {str(p)!r} does not exist")
    if p.suffix == ".fvecs":
        return check_vectors(_read_vecs(p, "<f4", name), name=f"{name} ({p})")
    if p.suffix == ".npy":
        return load_npy_file(p, name)
    raise VectorError(f"{name}: {str(p)!r}: unsupported file type {p.suffix!r}; use .npy or .fvecs")


def read_ids(path: str | Path, name: str = "ids") -> np.ndarray:
    """int64 [n] from a .npy (1-D integers) or .ivecs (one id per record) file."""
    p = Path(path)
    if not p.is_file():
        raise VectorError(f"{name}: file {str(p)!r} does not exist")
    if p.suffix == ".ivecs":
        ids = _read_vecs(p, "<i4", name)
        if ids.shape[1] != 1:
            raise VectorError(f"{name}: {str(p)!r} has {ids.shape[1]} ints per record; expected 1 id per record")
        return ids[:, 0].astype(np.int64)
    if p.suffix != ".npy":
        raise VectorError(f"{name}: {str(p)!r}: unsupported file type {p.suffix!r}; use .npy or .ivecs")
    try:
        ids = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise VectorError(f"{name}: {str(p)!r} is not a readable .npy array ({exc})") from None
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
        raise VectorError(f"{name}: {str(p)!r} holds {ids.dtype} {ids.shape}; expected a 1-D integer array")
    return ids.astype(np.int64)


def write_fvecs(path: str | Path, x: np.ndarray) -> None:
    """The inverse of :func:`read_vectors` for .fvecs (used by tests and exports)."""
    x = np.ascontiguousarray(x, dtype="<f4")
    rows = np.empty((x.shape[0], x.shape[1] + 1), dtype="<i4")
    rows[:, 0] = x.shape[1]
    rows[:, 1:] = x.view("<i4")
    rows.tofile(path)
