"""Is a model (encoder transform + codebooks) fit to encode with? Checked by whoever is
about to use one it did not compute: a client receiving the global model, the server
after every aggregation, ``vector_index reencode`` reading an .npz.

A model can be finite and still useless or hostile: a near-singular encoder collapses
the vectors onto a subspace (every code the same), a 1e38 centroid is never chosen and
overflows distance tables, a "rotation" that is not orthogonal distorts every distance.
The bounds are relative to data the checker knows (its own vectors, or the init).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .validation import VectorError


@dataclass(frozen=True)
class ModelBounds:
    """What a model must satisfy (``model_*`` keys of ``conf/privacy/*.yaml``)."""

    max_gain: float  # the encoder's singular values lie in [1/max_gain, max_gain]
    orthogonal_tol: float  # a rotation: max |R R^T - I|
    norm_slack: float  # a centroid's norm is at most this times the largest vector norm it could be the mean of

    def __post_init__(self) -> None:
        if not (self.max_gain >= 1 and 0 < self.orthogonal_tol < 1 and self.norm_slack >= 1):
            raise ValueError(f"model bounds: need max_gain >= 1, 0 < orthogonal_tol < 1, norm_slack >= 1; got {self}")


DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "conf" / "privacy" / "secure.yaml"  # a node's defaults


def default_bounds() -> ModelBounds:
    """The bounds a SuperNode applies unless its node config says otherwise."""
    from omegaconf import OmegaConf

    c = OmegaConf.load(DEFAULTS_FILE)
    return ModelBounds(float(c.model_max_gain), float(c.model_orthogonal_tol), float(c.model_norm_slack))


def check_model(codebooks: dict[str, np.ndarray], transform: tuple[np.ndarray, np.ndarray] | None, data_norm: float,
                bounds: ModelBounds, rotation: bool = False) -> None:
    """A whole model over vectors of norm <= data_norm: encoder (if any), then codebooks."""
    gain, offset = 1.0, 0.0
    if transform is not None:
        a, b = transform
        check_encoder(a, b, bounds, rotation)
        gain, offset = float(np.linalg.norm(a.astype(np.float64), ord=2)), float(np.linalg.norm(b))
    check_codebook_norms(codebooks, gain * data_norm + offset, bounds)


def check_encoder(a: np.ndarray, b: np.ndarray, bounds: ModelBounds, rotation: bool) -> None:
    """A finite, well-conditioned transform (orthogonal when it claims to be a rotation)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise VectorError("encoder: the transform holds NaN or infinite values")
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    lo, hi = 1.0 / bounds.max_gain, bounds.max_gain
    if s.min() < lo or s.max() > hi:
        raise VectorError(
            f"encoder: singular values span [{s.min():.3g}, {s.max():.3g}], outside [{lo:.3g}, {hi:.3g}] "
            "(a near-singular transform collapses the vectors, a large one overflows the codes)"
        )
    if rotation:
        err = float(np.abs(a.astype(np.float64) @ a.T.astype(np.float64) - np.eye(a.shape[0])).max())
        if err > bounds.orthogonal_tol or np.abs(b).max(initial=0.0) > 0:
            raise VectorError(f"encoder: a rotation must be orthogonal with no offset; max |R R^T - I| = {err:.3g} > {bounds.orthogonal_tol:g}")


def max_centroid_norm(level: str, vector_norm: float, coarse_norm: float) -> float:
    """The largest norm a centroid of ``level`` can have when the vectors it quantizes
    have norm <= vector_norm: coarse and PQ sub-centroids are means of (sub-)vectors;
    an IVF-PQ codebook quantizes residuals, up to vector_norm + the coarse norm."""
    return vector_norm + (coarse_norm if level == "pq" else 0.0)


def additive_target_norm(codebooks: np.ndarray, stage: int, vector_norm: float) -> float:
    """The largest norm a target of codebook ``stage`` can have (a vector minus one
    codeword of every other codebook): what that codebook's cell sums are bounded by."""
    norms = np.linalg.norm(np.asarray(codebooks, dtype=np.float64), axis=-1).max(axis=1)
    return vector_norm + float(norms.sum() - norms[stage])


def check_codebook_norms(codebooks: dict[str, np.ndarray], vector_norm: float, bounds: ModelBounds) -> None:
    """Every centroid within ``norm_slack`` x what a mean of the data could reach."""
    coarse = float(np.linalg.norm(codebooks["coarse"], axis=-1).max()) if "coarse" in codebooks else 0.0
    for level, book in codebooks.items():
        if not np.isfinite(book).all():
            raise VectorError(f"codebook level {level!r}: holds NaN or infinite values")
        norm = float(np.linalg.norm(book.astype(np.float64), axis=-1).max())
        limit = bounds.norm_slack * max_centroid_norm(level, vector_norm, min(coarse, bounds.norm_slack * vector_norm))
        if norm > limit:
            raise VectorError(
                f"codebook level {level!r}: a centroid of norm {norm:.3g} exceeds {limit:.3g} "
                f"({bounds.norm_slack:g} x the largest norm {vector_norm:.3g} of the vectors it quantizes)"
            )
