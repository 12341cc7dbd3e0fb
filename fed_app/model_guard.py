"""The global model is checked before anyone uses it: by a client before it trains,
evaluates, searches or deploys with a model the server sent, and by the server after
every aggregation, before the model is applied, saved or deployed.

Both check the same things (``vector_index.model_checks``): the codebooks' shapes, a
finite and well-conditioned encoder (orthogonal when it is a rotation), and centroids no
larger than means of the data could be. The data bound is the checker's own: a client's
largest vector norm, the server's public (or init) vectors.
"""

from __future__ import annotations

import numpy as np

from vector_index import model_checks
from vector_index.model_checks import ModelBounds
from vector_index.quantizers import IndexSpec
from vector_index.validation import VectorError

from .encoder import ROTATION_KEY, affine_of
from .state import GlobalState, arrays_digest


def max_norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64), axis=1).max(initial=0.0))


_PASSED: dict[tuple, None] = {}  # models this process already accepted, under the same spec, data bound and bounds


def check_model(state: GlobalState, spec: IndexSpec, dim: int, data_norm: float, bounds: ModelBounds) -> None:
    """Raise VectorError naming what is wrong; ``data_norm`` bounds the raw vectors' norm.
    Levels not trained yet (during init) may be absent. A model that passed once with the
    same arguments passes again without the work (a refusal is recomputed every time)."""
    key = (arrays_digest(state.encoder), arrays_digest(state.codebooks), spec, dim, data_norm, bounds)
    if key in _PASSED:
        return
    _check_model(state, spec, dim, data_norm, bounds)
    if len(_PASSED) >= 16:
        _PASSED.pop(next(iter(_PASSED)))
    _PASSED[key] = None


def _check_model(state: GlobalState, spec: IndexSpec, dim: int, data_norm: float, bounds: ModelBounds) -> None:
    for level, book in state.codebooks.items():
        if level not in spec.levels:
            raise VectorError(f"codebook level {level!r}: a {spec.kind} index has levels {list(spec.levels)}")
        if np.shape(book) != spec.level_shape(level, dim):
            raise VectorError(f"codebook level {level!r}: shape {np.shape(book)}, expected {spec.level_shape(level, dim)}")
    try:
        a, b = affine_of(state.encoder)
    except (KeyError, RuntimeError, ValueError, IndexError) as e:  # torch's load_state_dict on wrong keys or shapes
        raise VectorError(f"encoder: its weights do not load ({str(e).splitlines()[0]})") from None
    if a.shape != (dim, dim):
        raise VectorError(f"encoder: a {a.shape} transform, expected {(dim, dim)}")
    model_checks.check_model(state.codebooks, (a, b), data_norm, bounds, rotation=ROTATION_KEY in state.encoder)
