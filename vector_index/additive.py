"""Federated additive quantization (RQ, LSQ) as small functions over numpy arrays.

An additive quantizer reconstructs ``x ~ C[0, c0] + C[1, c1] + ... + C[M-1, c_{M-1}]``
with M full-dimensional codebooks ``C[M, K, d]`` (unlike PQ's ``[M, K, d/M]``). Both
training algorithms reduce to sums a client can send and a server can add up:

* Residual quantizer (RQ): stage m is a k-means on the residuals left by stages
  0..m-1. One Lloyd step of stage m needs, per codeword, the sum and count of the
  residuals assigned to it (:func:`rq_stage_statistics`), as ``fed_app.lloyd`` does
  for PQ. Residuals come from faiss's own beam search (:func:`rq_residuals`).
* Local search quantizer (LSQ): with codes fixed, the codebooks solve the ridge
  least-squares problem ``C = (BᵀB + λI)⁻¹ BᵀX``, B the one-hot code matrix
  ``[n, M*K]``. ``BᵀB`` and ``BᵀX`` are sums over vectors, so over clients
  (:func:`lsq_normal_statistics`, then :func:`lsq_solve` at the server).

Encoding stays local and is faiss's: :func:`rq_from_codebooks`,
:func:`lsq_from_codebooks` and :func:`additive_index` build faiss objects from given
codebooks that encode and search exactly as the faiss objects trained to them.

Nothing here knows about Flower, secure aggregation or DP: callers protect the sums.
"""

from __future__ import annotations

import faiss
import numpy as np

from .validation import VectorError, check_vectors

# faiss LocalSearchQuantizer::lambd: a C++ float 1e-2f, added once to the diagonal of
# the *total* BᵀB (not scaled by n). Using the float32 value keeps the solve identical.
LSQ_LAMBDA = float(np.float32(1e-2))
RQ_BEAM_SIZE = 5  # faiss ResidualQuantizer::max_beam_size default (training and encoding)
LSQ_ENCODE_ILS_ITERS = 16  # faiss LocalSearchQuantizer::encode_ils_iters default
LSQ_RANDOM_SEED = 0x12345  # faiss LocalSearchQuantizer::random_seed default

_AQ = faiss.AdditiveQuantizer
# Search types whose norm needs nothing beyond the codebooks (float norms are computed
# at encoding time; from_LUT from codebook tables; decompress/LUT_nonorm store none).
_FREE_NORMS = (_AQ.ST_decompress, _AQ.ST_LUT_nonorm, _AQ.ST_norm_from_LUT, _AQ.ST_norm_float)
# Scalar-quantized norms also need the [min, max] of the training reconstructions' norms.
_RANGE_NORMS = (_AQ.ST_norm_qint8, _AQ.ST_norm_qint4)


def _check_codebooks(codebooks: np.ndarray, name: str = "codebooks") -> tuple[np.ndarray, int, int, int, int]:
    """(float32 [M, K, d] codebooks, M, K, d, nbits), or a VectorError."""
    c = np.asarray(codebooks)
    if c.ndim != 3:
        raise VectorError(f"{name}: expected [M, K, d], got shape {c.shape}")
    m, k, d = c.shape
    nbits = int(k).bit_length() - 1
    if m < 1 or d < 1 or k < 2 or 1 << nbits != k:
        raise VectorError(f"{name}: shape {c.shape}; need M >= 1, d >= 1 and K a power of 2 >= 2")
    if c.dtype not in (np.float32, np.float64) or not np.isfinite(c).all():
        raise VectorError(f"{name}: must be finite float32/float64 (dtype {c.dtype})")
    return np.ascontiguousarray(c, dtype=np.float32), m, k, d, nbits


def additive_codebooks(aq: faiss.AdditiveQuantizer) -> np.ndarray:
    """The ``[M, K, d]`` codebooks of a trained faiss RQ/LSQ (uniform nbits only)."""
    nbits = set(faiss.vector_to_array(aq.nbits).tolist())
    if len(nbits) != 1:
        raise VectorError(f"additive quantizer has mixed nbits {sorted(nbits)}; only uniform nbits are supported")
    k = 1 << nbits.pop()
    return faiss.vector_to_array(aq.codebooks).reshape(aq.M, k, aq.d).copy()


def unpack_codes(aq: faiss.AdditiveQuantizer, packed: np.ndarray) -> np.ndarray:
    """``[n, M]`` int32 codeword indices of faiss's packed codes (norm bits, if any, dropped)."""
    nbits = faiss.vector_to_array(aq.nbits).astype(np.int32)
    return faiss.unpack_bitstrings(np.ascontiguousarray(packed, dtype=np.uint8), nbits)


def _inject(
    aq: faiss.AdditiveQuantizer, books: np.ndarray, search_type: int, norm_range: tuple[float, float] | None
) -> None:
    """Codebooks (and the norm range, when the search type stores quantized norms) into ``aq``.

    Mirrors the end of faiss's ``train``: ``is_trained`` and the codebook tables
    (centroid norms and cross products, used by ST_norm_from_LUT and the LUT beam).
    """
    if search_type in _RANGE_NORMS:
        if norm_range is None:
            raise VectorError(
                "ST_norm_qint8/qint4 quantize ||reconstruction||^2 between norm_min and norm_max "
                "(faiss sets them in train_norm); pass norm_range=(min, max)"
            )
        aq.norm_min, aq.norm_max = float(norm_range[0]), float(norm_range[1])
    elif search_type not in _FREE_NORMS:
        raise VectorError(
            f"search_type {search_type}: norms quantized by a trained codebook (cqint, lsq2x4, rq2x4) "
            "cannot be injected here; use ST_decompress, ST_norm_float, ST_norm_qint8/qint4 or ST_norm_from_LUT"
        )
    faiss.copy_array_to_vector(books.ravel(), aq.codebooks)
    aq.is_trained = True
    aq.compute_codebook_tables()


def _configure_rq(
    rq: faiss.ResidualQuantizer,
    books: np.ndarray,
    beam_size: int,
    search_type: int,
    norm_range: tuple[float, float] | None,
    use_beam_lut: int,
) -> None:
    if beam_size < 1:
        raise VectorError(f"RQ beam_size={beam_size} must be >= 1")
    rq.max_beam_size = int(beam_size)
    rq.use_beam_LUT = int(use_beam_lut)
    _inject(rq, books, search_type, norm_range)


def _configure_lsq(
    lsq: faiss.LocalSearchQuantizer,
    books: np.ndarray,
    encode_ils_iters: int,
    random_seed: int,
    search_type: int,
    norm_range: tuple[float, float] | None,
) -> None:
    lsq.encode_ils_iters = int(encode_ils_iters)
    lsq.random_seed = int(random_seed)
    # faiss's train() clamps nperts to M; an untrained LSQ with M < nperts refuses to encode
    lsq.nperts = min(int(lsq.nperts), int(lsq.M))
    _inject(lsq, books, search_type, norm_range)


def rq_from_codebooks(
    codebooks: np.ndarray,
    beam_size: int = RQ_BEAM_SIZE,
    search_type: int = _AQ.ST_decompress,
    norm_range: tuple[float, float] | None = None,
    use_beam_lut: int = 0,
) -> faiss.ResidualQuantizer:
    """A faiss ResidualQuantizer from ``[M, K, d]`` codebooks: encodes with faiss's beam search.

    ``beam_size`` is faiss's ``max_beam_size``; it changes the codes, so encoders and
    the trainer must agree on it. ``use_beam_lut=1`` is faiss's faster LUT beam
    search (same search, different float rounding of the distances).
    """
    books, m, _, d, nbits = _check_codebooks(codebooks)
    rq = faiss.ResidualQuantizer(d, m, nbits, search_type)
    _configure_rq(rq, books, beam_size, search_type, norm_range, use_beam_lut)
    return rq


def lsq_from_codebooks(
    codebooks: np.ndarray,
    encode_ils_iters: int = LSQ_ENCODE_ILS_ITERS,
    search_type: int = _AQ.ST_decompress,
    norm_range: tuple[float, float] | None = None,
    random_seed: int = LSQ_RANDOM_SEED,
) -> faiss.LocalSearchQuantizer:
    """A faiss LocalSearchQuantizer from ``[M, K, d]`` codebooks: encodes with faiss's ILS/ICM.

    faiss re-seeds its generator with ``random_seed`` on every ``compute_codes`` call,
    so codes are a deterministic function of (codebooks, seed, the whole batch): the same
    vector can get other codes in another batch, because the random start codes and
    perturbations are drawn in batch order.
    """
    books, m, _, d, nbits = _check_codebooks(codebooks)
    lsq = faiss.LocalSearchQuantizer(d, m, nbits, search_type)
    _configure_lsq(lsq, books, encode_ils_iters, random_seed, search_type, norm_range)
    return lsq


def additive_index(
    kind: str,
    codebooks: np.ndarray,
    *,
    search_type: int = _AQ.ST_decompress,
    norm_range: tuple[float, float] | None = None,
    beam_size: int = RQ_BEAM_SIZE,
    use_beam_lut: int = 0,
    encode_ils_iters: int = LSQ_ENCODE_ILS_ITERS,
    random_seed: int = LSQ_RANDOM_SEED,
    metric: int = faiss.METRIC_L2,
) -> faiss.IndexResidualQuantizer | faiss.IndexLocalSearchQuantizer:
    """An empty, ready-to-add ``IndexResidualQuantizer`` (kind "rq") or
    ``IndexLocalSearchQuantizer`` ("lsq") with injected codebooks.

    ``search_type`` fixes the code size: ST_decompress (faiss's factory default for L2,
    ``M*nbits`` bits, search decodes every code) and ST_norm_from_LUT add no bytes;
    ST_norm_float adds 4 bytes, qint8 1, qint4 half a byte per vector. It must be
    given at construction, since the index copies the quantizer's code size then.
    The index takes no user ids: wrap it in ``faiss.IndexIDMap`` as the store does.
    """
    books, m, _, d, nbits = _check_codebooks(codebooks)
    if kind == "rq":
        index = faiss.IndexResidualQuantizer(d, m, nbits, metric, search_type)
        _configure_rq(index.rq, books, beam_size, search_type, norm_range, use_beam_lut)
    elif kind == "lsq":
        index = faiss.IndexLocalSearchQuantizer(d, m, nbits, metric, search_type)
        _configure_lsq(index.lsq, books, encode_ils_iters, random_seed, search_type, norm_range)
    else:
        raise VectorError(f"additive index kind {kind!r} is not one of 'rq', 'lsq'")
    index.is_trained = True
    return index


# --------------------------------------------------------------------------- RQ


def rq_beam(
    x: np.ndarray, codebooks_done: np.ndarray, beam_size: int = RQ_BEAM_SIZE, batch: int = 8192
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss's beam after encoding ``x`` with the first m stages (``codebooks_done[m, K, d]``).

    Returns codes ``[n, B, m]`` int32, residuals ``[n, B, d]`` and squared residual
    norms ``[n, B]``, best first, with ``B = min(K**m, beam_size)``. This is faiss's
    ``ResidualQuantizer::refine_beam`` (the loop of ``compute_codes`` and of ``train``):
    residuals are faiss's own successive float32 subtractions, not ``x - decode``.
    ``m = 0`` (no stage trained yet) gives the beam of one: ``x`` itself.
    """
    x = check_vectors(x, name="vectors")
    n, d = x.shape
    if np.asarray(codebooks_done).size == 0:
        return np.zeros((n, 1, 0), np.int32), x[:, None, :].copy(), np.einsum("ij,ij->i", x, x)[:, None]
    books, m, k, dc, _ = _check_codebooks(codebooks_done, "codebooks_done")
    if dc != d:
        raise VectorError(f"codebooks_done have d={dc}, vectors have d={d}")
    rq = rq_from_codebooks(books, beam_size)
    b = min(k**m, int(beam_size))
    codes = np.empty((n, b, m), np.int32)
    res = np.empty((n, b, d), np.float32)
    dis = np.empty((n, b), np.float32)
    for i0 in range(0, n, batch):  # refine_beam allocates n * beam * d floats: bound it
        i1 = min(n, i0 + batch)
        xb = np.ascontiguousarray(x[i0:i1])
        cb, rb, db = codes[i0:i1], res[i0:i1], dis[i0:i1]  # contiguous row slices
        rq.refine_beam(i1 - i0, 1, faiss.swig_ptr(xb), b, faiss.swig_ptr(cb), faiss.swig_ptr(rb), faiss.swig_ptr(db))
    return codes, res, dis


def rq_residuals(
    x: np.ndarray, codebooks_done: np.ndarray, beam_size: int = RQ_BEAM_SIZE, all_beams: bool = False
) -> np.ndarray:
    """The vectors faiss trains RQ stage m on, given the m stages already trained.

    ``all_beams=False``: the best beam entry per vector, ``[n, d]`` (= ``x`` minus the
    reconstruction by ``compute_codes`` of the m-stage RQ, to float32 rounding).
    ``all_beams=True``: every beam entry, ``[n*B, d]`` in (vector, beam) order, which is
    what faiss's default RQ training clusters (each vector counts B times from stage 1).
    """
    _, res, _ = rq_beam(x, codebooks_done, beam_size)
    return np.ascontiguousarray(res.reshape(-1, res.shape[2]) if all_beams else res[:, 0])


def rq_stage_statistics(residuals: np.ndarray, stage_centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per codeword: sum ``[K, d]`` (float64) and count ``[K]`` of the residuals nearest to it,
    plus the squared error. One client's message for one Lloyd step of one RQ stage.

    Assignment is faiss ``IndexFlatL2`` search, as in faiss's k-means; sums are float64
    so that adding clients in any order gives the same step.
    """
    r = check_vectors(residuals, name="residuals")
    c = check_vectors(np.asarray(stage_centroids), dim=r.shape[1], name="stage centroids")
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    dist, assign = index.search(r, 1)
    assign = assign.ravel()
    k = c.shape[0]
    sums = np.zeros((k, r.shape[1]), np.float64)
    np.add.at(sums, assign, r.astype(np.float64))
    counts = np.bincount(assign, minlength=k).astype(np.int64)
    return sums, counts, float(dist.astype(np.float64).sum())


def rq_stage_update(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, int]:
    """New stage centroids = summed sums / summed counts; empty cells keep their previous centroid.

    Returns the ``[K, d]`` float32 centroids and the number of empty cells. (faiss's
    k-means instead splits a large cluster into an empty one; see ``fed_app.lloyd``.)
    """
    out = np.asarray(previous, dtype=np.float32).copy()
    counts = np.asarray(counts)
    filled = counts > 0
    out[filled] = (np.asarray(sums)[filled] / counts[filled, None]).astype(np.float32)
    return out, int((~filled).sum())


# -------------------------------------------------------------------------- LSQ


def lsq_normal_statistics(
    x: np.ndarray, codes: np.ndarray, m: int, k: int, chunk: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """A client's ``BᵀB`` ``[M*K, M*K]`` (int64 co-occurrence counts) and ``BᵀX`` ``[M*K, d]`` (float64).

    B is never built: row i of B has ones at ``j*K + codes[i, j]``, so ``BᵀB`` counts
    pairs of codewords used by the same vector (its diagonal: how often each codeword is
    used) and ``BᵀX`` sums the vectors using each codeword. Sums over clients give the
    union's matrices exactly (integers, and float64 sums of float32 data).
    """
    x = check_vectors(x, name="vectors")
    codes = np.asarray(codes)
    if codes.shape != (x.shape[0], m) or not np.issubdtype(codes.dtype, np.integer):
        raise VectorError(f"codes: expected integer [n={x.shape[0]}, M={m}], got {codes.dtype} {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= k):
        raise VectorError(f"codes: values must be in [0, K={k}), got [{codes.min()}, {codes.max()}]")
    mk = m * k
    rows = codes.astype(np.int64) + np.arange(m, dtype=np.int64) * k  # [n, M] column of B per codebook
    btb = np.zeros(mk * mk, np.int64)
    for i0 in range(0, rows.shape[0], chunk):  # [chunk, M, M] pair indices at a time
        r = rows[i0 : i0 + chunk]
        btb += np.bincount((r[:, :, None] * mk + r[:, None, :]).ravel(), minlength=mk * mk)
    btx = np.zeros((mk, x.shape[1]), np.float64)
    x64 = x.astype(np.float64)
    for j in range(m):
        np.add.at(btx, rows[:, j], x64)
    return btb.reshape(mk, mk), btx


def lsq_solve(btb: np.ndarray, btx: np.ndarray, eta: float = LSQ_LAMBDA, *, m: int) -> np.ndarray:
    """Codebooks ``[M, K, d]`` = ``(BᵀB + eta I)⁻¹ BᵀX`` from statistics summed over clients.

    ``eta`` is faiss's ``lambd``, added once to the total (never per client, which would
    make the regulariser grow with the number of clients). It is needed: every row of B
    has exactly one 1 per codebook, so BᵀB is singular (shifting one codebook by v and
    another by -v changes no reconstruction). Solved in float64 as faiss does by
    default (``update_codebooks_with_double``), by LU solve instead of faiss's explicit
    inverse: the same solution to float64 rounding.
    """
    btb = np.asarray(btb, dtype=np.float64)
    btx = np.asarray(btx, dtype=np.float64)
    mk = btb.shape[0]
    if btb.shape != (mk, mk) or btx.ndim != 2 or btx.shape[0] != mk or m < 1 or mk % m:
        raise VectorError(f"lsq_solve: BᵀB {btb.shape} and BᵀX {btx.shape} do not match M={m}")
    if eta <= 0:
        raise VectorError(f"lsq_solve: eta={eta} must be > 0 (BᵀB is singular)")
    c = np.linalg.solve(btb + eta * np.eye(mk), btx)
    if not np.isfinite(c).all():
        raise VectorError("lsq_solve: non-finite codebooks (non-finite statistics?)")
    return c.astype(np.float32).reshape(m, mk // m, btx.shape[1])


# ------------------------------------------------------- one codebook at a time


def round_plan(server_round: int, m: int, stage_rounds: int = 0) -> tuple[int, bool]:
    """(the codebook federated round ``server_round`` updates, whether it is a greedy RQ step).

    With ``stage_rounds`` T > 0 (RQ), rounds 1..M*T train the stages in order as faiss
    does, T Lloyd steps each on the residuals the stages before it leave (greedy:
    later stages play no part, :func:`rq_residuals` / :func:`rq_stage_statistics`).
    Every later round, and every round of LSQ (T = 0), is one exact block update of
    one codebook with all others in place (:func:`block_targets`), each in turn.
    Both sides derive the plan from the round number, so no message carries it.
    """
    r = max(int(server_round), 1) - 1
    if r < m * stage_rounds:
        return r // stage_rounds, True
    return (r - m * stage_rounds) % m, False


def block_targets(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray, stage: int) -> np.ndarray:
    """``x`` minus the codewords of every codebook but ``stage``: what codebook ``stage``
    has to reconstruct when the others and the codes stay fixed.

    The mean of these targets per codeword of ``stage`` is the exact least-squares
    update of that codebook alone (a Gauss-Seidel block of LSQ's joint solve, and for
    RQ one Lloyd step of that stage with all others in place). Updating every codebook
    at once from the same codes (Jacobi) diverges: shifting all M codebooks by v moves
    every reconstruction by M v, so the simultaneous step overshoots M-fold.
    """
    books = np.asarray(codebooks, dtype=np.float32)
    others = np.zeros_like(x, dtype=np.float32)
    for j in range(books.shape[0]):
        if j != stage:
            others += books[j][codes[:, j]]
    return np.ascontiguousarray(x - others, dtype=np.float32)


def block_statistics(targets: np.ndarray, stage_codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``[1, K, d]`` (float64) and count ``[1, K]`` of the targets per codeword of the
    stage: a client's whole message for one federated codebook step (PQ's record layout
    with M=1, so the strategy's secure sum, DP noise and Lloyd update take it as they are)."""
    sums = np.zeros((k, targets.shape[1]), np.float64)
    np.add.at(sums, stage_codes, targets.astype(np.float64))
    return sums[None], np.bincount(stage_codes, minlength=k).astype(np.int64)[None]
