"""What the server accepts in a client's reply (plain protocol), checked on arrival.

A reply that fails is dropped and its node named (log, ``summary.json``
``rejected_nodes``); the round aggregates the others. The bounds come from what the
server itself sent (shapes, the codebooks' levels), from the data contract (a centroid
is a mean of vectors no larger than the server's own data bound times the slack), and
from the statistics' own consistency (a count is a non-negative integer, cells of one
sub-space count each vector at most once, so they sum to at most num-examples).

Under secure aggregation no single reply can be read; there the fixed-point range and
the clients' clipping bound each input, and the aggregate is checked as a model
(``model_guard``) before it is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from flwr.app import RecordDict

from vector_index.additive import round_plan
from vector_index.model_checks import ModelBounds, additive_target_norm, max_centroid_norm
from vector_index.quantizers import IndexSpec
from vector_index.validation import ADDITIVE_KINDS, VectorError

from .encoder import affine_of
from .model_guard import check_model
from .state import ENCODER, GlobalState, arrays_of


class InvalidReply(ValueError):
    """A reply the server will not aggregate; the message says what is wrong with it."""


@dataclass(frozen=True)
class Expected:
    """What a valid training reply looks like in this round."""

    spec: IndexSpec
    dim: int
    encoder: dict[str, np.ndarray]  # the global encoder sent (keys, shapes, dtypes)
    codebooks: dict[str, np.ndarray]  # level -> global codebook sent
    mode: str  # the strategy's codebook_update
    data_norm: float  # the server's bound on a raw vector's norm
    bounds: ModelBounds
    examples_digits: int  # num-examples arrive rounded to this many significant digits
    min_count: int  # cells under this many vectors are withheld (zero) by a node
    server_round: int = 1  # an additive level's update is that of this round's codebook (round_plan)

    def tolerance(self) -> float:
        """Relative error of a count rounded to ``examples_digits`` significant digits."""
        return 0.5 * 10.0 ** (1 - self.examples_digits) if self.examples_digits > 0 else 0.0

    @cached_property
    def vector_norm(self) -> float:
        """Bound on an encoded vector's norm under the encoder sent (once per round)."""
        a, b = affine_of(self.encoder)
        return float(np.linalg.norm(a.astype(np.float64), ord=2)) * self.data_norm + float(np.linalg.norm(b))


def _array(record: dict[str, np.ndarray], key: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if key not in record:
        raise InvalidReply(f"array {key!r} is missing")
    a = record[key]
    if a.shape != shape:
        raise InvalidReply(f"array {key!r} has shape {a.shape}, expected {shape}")
    if kind == "float" and a.dtype not in (np.float32, np.float64):
        raise InvalidReply(f"array {key!r} has dtype {a.dtype}, expected float32/float64")
    if kind == "int" and a.dtype.kind not in "iu":
        raise InvalidReply(f"array {key!r} has dtype {a.dtype}, expected integers")
    if not np.isfinite(a).all():
        raise InvalidReply(f"array {key!r} holds NaN or infinite values")
    return a


def _count(value: object, what: str, low: float = 0.0) -> float:
    v = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not math.isfinite(v) or v != round(v) or v < low or v > 2.0**53:
        raise InvalidReply(f"{what} must be an integer >= {low:g}, got {value!r}")
    return v


def train_reply(content: RecordDict, exp: Expected) -> tuple[dict[str, np.ndarray], float]:
    """(codebook update, num-examples) of a valid reply; raises InvalidReply."""
    if "arrays" not in content.array_records:
        raise InvalidReply("no encoder record 'arrays'")
    if not content.metric_records:
        raise InvalidReply("no metrics record")
    n = _count(next(iter(content.metric_records.values())).get("num-examples"), "num-examples", 1.0)
    sent = arrays_of(content.array_records["arrays"])
    extra = sorted(set(sent) - {ENCODER + k for k in exp.encoder})
    if extra:
        raise InvalidReply(f"unexpected encoder arrays {extra}")
    weights = {k: _array(sent, ENCODER + k, v.shape, "float") for k, v in exp.encoder.items()}
    try:
        check_model(GlobalState(encoder=weights), exp.spec, exp.dim, exp.data_norm, exp.bounds)
    except VectorError as e:
        raise InvalidReply(str(e)) from None
    if exp.mode in ("none", "local"):
        return {}, n
    if "codebook-update" not in content.array_records:
        raise InvalidReply("no 'codebook-update' record")
    update = arrays_of(content.array_records["codebook-update"])
    wanted = {f"{lvl}.{what}" for lvl in exp.codebooks for what in (("sums", "counts") if exp.mode == "lloyd" else ("centroids",))}
    if set(update) != wanted:
        raise InvalidReply(f"codebook-update holds {sorted(update)}, expected {sorted(wanted)}")
    norm = exp.vector_norm
    coarse = float(np.linalg.norm(exp.codebooks["coarse"], axis=-1).max()) if "coarse" in exp.codebooks else 0.0
    for level, book in exp.codebooks.items():
        limit = exp.bounds.norm_slack * max_centroid_norm(level, norm, coarse)
        if level in ADDITIVE_KINDS:  # one codebook's targets: x minus the other codebooks' codewords
            stage, _ = round_plan(exp.server_round, book.shape[0], exp.spec.stage_rounds)
            limit = exp.bounds.norm_slack * additive_target_norm(book, stage, norm)
            book = book[stage : stage + 1]
        if exp.mode != "lloyd":
            cents = _array(update, f"{level}.centroids", book.shape, "float")
            if np.linalg.norm(cents, axis=-1).max() > limit:
                raise InvalidReply(f"{level}.centroids: a centroid's norm exceeds {limit:.3g}")
            continue
        sums = _array(update, f"{level}.sums", book.shape, "float")
        counts = _array(update, f"{level}.counts", book.shape[:2], "int")
        if counts.min() < 0:
            raise InvalidReply(f"{level}.counts: negative counts")
        if np.any(np.linalg.norm(sums, axis=-1) > counts * limit * (1 + 1e-6)):
            raise InvalidReply(f"{level}.sums: a cell's sum exceeds its count x {limit:.3g} (the largest norm its vectors may have)")
        tol = exp.tolerance()
        per_space = counts.sum(axis=1)
        if per_space.max() > n * (1 + tol) + 1:
            raise InvalidReply(f"{level}.counts: {int(per_space.max())} vectors in one sub-space, more than num-examples={n:g}")
        withheld = (counts == 0).sum(axis=1) * (exp.min_count - 1)  # the most a node can leave out per sub-space
        most = per_space + withheld
        j = int(most.argmin())
        if n > most[j] * (1 + tol) + 1:
            raise InvalidReply(f"num-examples={n:g} is more than {level}.counts account for in sub-space {j} "
                               f"({int(per_space[j])} counted, at most {int(withheld[j])} in its withheld cells)")
    return update, n


EVAL_RATIOS = ("estimate.recall_1_at_1", "estimate.recall_1_at_10", "estimate.recall_10_at_10")


def evaluate_reply(content: RecordDict, exp: Expected) -> None:
    """Raise InvalidReply unless the evaluation metrics are sane for this data bound."""
    if not content.metric_records:
        raise InvalidReply("no metrics record")
    m = next(iter(content.metric_records.values()))
    n = _count(m.get("num-examples"), "num-examples", 1.0)
    top = (exp.bounds.norm_slack * exp.vector_norm) ** 2
    for key, most in (("energy", top), ("distortion", 4 * top)):
        v = m.get(key)
        if not isinstance(v, (int, float)) or not (0.0 <= float(v) <= most):
            raise InvalidReply(f"{key} must be in [0, {most:.3g}], got {v!r}")
    queries = _count(m.get("estimate.queries", 0.0), "estimate.queries")
    if queries > n * (1 + exp.tolerance()) + 1:
        raise InvalidReply(f"estimate.queries={queries:g} exceeds num-examples={n:g}")
    for key in EVAL_RATIOS:
        v = m.get(key, 0.0)
        if not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
            raise InvalidReply(f"{key} must be in [0, 1], got {v!r}")


def init_reply(content: RecordDict, shape: tuple[int, int, int], vector_norm: float, coarse_norm: float, level: str, bounds: ModelBounds) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [M, k', dsub], counts [M, k']) of a valid k-FED init reply."""
    if "init" not in content.array_records:
        raise InvalidReply("no 'init' record")
    arrays = arrays_of(content.array_records["init"])
    m, _, dsub = shape
    cents = arrays.get("centroids")
    if cents is None or cents.ndim != 3 or cents.shape[0] != m or cents.shape[2] != dsub or cents.shape[1] < 1:
        raise InvalidReply(f"init centroids: shape {None if cents is None else cents.shape}, expected ({m}, k', {dsub})")
    cents = _array(arrays, "centroids", cents.shape, "float")
    counts = _array(arrays, "counts", cents.shape[:2], "int")
    if counts.min() < 0:
        raise InvalidReply("init counts: negative counts")
    limit = bounds.norm_slack * max_centroid_norm(level, vector_norm, coarse_norm)
    if np.linalg.norm(cents, axis=-1).max() > limit:
        raise InvalidReply(f"init centroids: a centroid's norm exceeds {limit:.3g}")
    return cents, counts


def search_reply(content: RecordDict, nq: int, k: int | None, keys: tuple[str, ...]) -> None:
    """A node's search answer: for top-k, ``<key>distances`` / ``<key>ids`` of shape
    [nq, <= k]; for range search (k None), ``lims`` [nq + 1] delimiting flat arrays.
    Distances are not NaN or -inf (compressed ones may be slightly negative: IVF-PQ's
    precomputed tables; faiss pads with FLT_MAX and id -1); ids >= -1."""
    if "results" not in content.array_records:
        raise InvalidReply("no 'results' record")
    res = arrays_of(content.array_records["results"])
    for prefix in keys:
        d, i = res.get(prefix + "distances"), res.get(prefix + "ids")
        if d is None or i is None:
            raise InvalidReply(f"results lack {prefix}distances / {prefix}ids")
        if k is None:
            lims = res.get("lims")
            if lims is None or lims.shape != (nq + 1,) or lims.dtype.kind not in "iu" or lims[0] != 0 or np.any(np.diff(lims) < 0):
                raise InvalidReply(f"range results: lims must be {nq + 1} non-decreasing integers from 0")
            want = (int(lims[-1]),)
        else:
            want = (nq, d.shape[1] if d.ndim == 2 else -1)
            if d.ndim != 2 or d.shape[0] != nq or not 1 <= d.shape[1] <= k:
                raise InvalidReply(f"{prefix}distances: shape {d.shape}, expected ({nq}, <= {k})")
        if d.shape != want or i.shape != want:
            raise InvalidReply(f"{prefix}distances / {prefix}ids: shapes {d.shape} / {i.shape}, expected {want}")
        if d.dtype.kind != "f" or i.dtype.kind not in "iu":
            raise InvalidReply(f"{prefix}distances must be floats and {prefix}ids integers (got {d.dtype} / {i.dtype})")
        if np.isnan(d).any() or np.isneginf(d).any() or (i < -1).any():
            raise InvalidReply(f"{prefix}distances must not be NaN or -inf, and {prefix}ids must be >= -1")
