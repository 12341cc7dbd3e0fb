"""Federated additive quantization maths (vector_index.additive) with faiss as the oracle.

Data: 4000 GloVe-6B-50d vectors (d=50, L2-normalised) split into three uneven shards
(300 / 1200 / 2500). One faiss thread (conftest ``one_faiss_thread``): deterministic and
polite on the shared machine. The whole file runs in a few seconds.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from vector_index.additive import (
    block_statistics,
    block_targets,
    round_plan,
    LSQ_LAMBDA,
    additive_codebooks,
    additive_index,
    lsq_from_codebooks,
    lsq_normal_statistics,
    lsq_solve,
    rq_beam,
    rq_from_codebooks,
    rq_residuals,
    rq_stage_statistics,
    rq_stage_update,
    unpack_codes,
)
from vector_index.datasets import load_glove
from vector_index.validation import VectorError

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

N, NQ = 4000, 100
CUTS = [300, 1500]  # shards of 300, 1200, 2500 vectors
BEAM = 5  # faiss's default max_beam_size
RQ = faiss.ResidualQuantizer


@pytest.fixture(scope="module")
def glove() -> tuple[np.ndarray, np.ndarray]:
    ds = load_glove(num_base=N, num_queries=NQ, seed=0)
    return ds.base, ds.queries


@pytest.fixture(scope="module")
def x(glove) -> np.ndarray:
    return glove[0]


def shards_of(x: np.ndarray) -> list[np.ndarray]:
    perm = np.random.default_rng(2).permutation(x.shape[0])
    return [np.ascontiguousarray(x[p]) for p in np.split(perm, CUTS)]


def test_shards_are_uneven(x):
    assert [s.shape[0] for s in shards_of(x)] == [300, 1200, 2500]
    assert x.shape == (N, 50)


# ----------------------------------------------------------------------------- RQ


def train_faiss_rq(x: np.ndarray, m: int, nbits: int, train_type: int) -> faiss.ResidualQuantizer:
    rq = faiss.ResidualQuantizer(x.shape[1], m, nbits)
    rq.train_type = train_type
    rq.max_beam_size = BEAM
    rq.train(x)
    return rq


@pytest.mark.parametrize("train_type", [RQ.Train_default, RQ.Train_progressive_dim], ids=["kmeans", "progressive_dim"])
def test_rq_residuals_are_what_faiss_trains_each_stage_on(x, train_type):
    """faiss's own RQ training, replayed stage by stage with faiss's own clustering on
    ``rq_residuals(..., all_beams=True)``, gives bit-identical codebooks: the residuals
    are exactly faiss's training set (all B beam entries per vector, B = min(K**m, 5))."""
    m_total, nbits = 3, 5
    k = 1 << nbits
    rq = train_faiss_rq(x, m_total, nbits, train_type)
    books = additive_codebooks(rq)
    d = x.shape[1]
    for m in range(m_total):
        r = rq_residuals(x, books[:m], BEAM, all_beams=True)
        assert r.shape == (N * min(k**m, BEAM), d)
        if train_type == RQ.Train_default:
            clus = faiss.Clustering(d, k, rq.cp)
            clus.train(r, faiss.IndexFlatL2(d))
        else:
            clus = faiss.ProgressiveDimClustering(d, k, rq.cp)
            clus.train(r.shape[0], faiss.swig_ptr(r), faiss.ProgressiveDimIndexFactory())
        np.testing.assert_array_equal(faiss.vector_to_array(clus.centroids).reshape(k, d), books[m])


@pytest.fixture(scope="module")
def rq_books(x) -> np.ndarray:
    """Three trained stages (faiss default training); tests federate stage 2 on top of 0-1."""
    return additive_codebooks(train_faiss_rq(x, 3, 6, RQ.Train_progressive_dim))


def test_rq_top_beam_is_faiss_encoding_of_the_partial_rq(x, rq_books):
    codes, res, dis = rq_beam(x, rq_books[:2], BEAM)
    assert codes.shape == (N, BEAM, 2) and res.shape == (N, BEAM, 50) and dis.shape == (N, BEAM)
    partial = rq_from_codebooks(rq_books[:2], BEAM)
    packed = partial.compute_codes(x)
    np.testing.assert_array_equal(codes[:, 0], unpack_codes(partial, packed))  # same codes, exactly
    # faiss subtracts stage by stage in float32; x - decode sums the codewords first
    np.testing.assert_allclose(res[:, 0], x - partial.decode(packed), rtol=0, atol=1e-6)
    np.testing.assert_allclose(dis, (res.astype(np.float64) ** 2).sum(axis=2), rtol=1e-5, atol=1e-6)
    assert (np.diff(dis, axis=1) >= 0).all()  # best first
    np.testing.assert_array_equal(rq_residuals(x, rq_books[:2], BEAM), res[:, 0])
    # no stage yet: the residual is the vector itself
    np.testing.assert_array_equal(rq_residuals(x, rq_books[:0], BEAM), x)


@pytest.mark.parametrize("all_beams", [False, True], ids=["top_beam", "all_beams"])
def test_shard_residuals_are_the_union_residuals(x, rq_books, all_beams):
    """Encoding is per vector, so residuals computed on shards are the union's, bit for bit."""
    union = rq_residuals(x, rq_books[:2], BEAM, all_beams)
    perm = np.concatenate(np.split(np.random.default_rng(2).permutation(N), CUTS))
    b = union.shape[0] // N
    rows = (perm[:, None] * b + np.arange(b)).ravel()
    shards = np.concatenate([rq_residuals(s, rq_books[:2], BEAM, all_beams) for s in shards_of(x)])
    np.testing.assert_array_equal(shards, union[rows])


def federated_stage_step(x, books_done, start, all_beams):
    stats = [rq_stage_statistics(rq_residuals(s, books_done, BEAM, all_beams), start) for s in shards_of(x)]
    sums = sum(s[0] for s in stats)
    counts = sum(s[1] for s in stats)
    sse = sum(s[2] for s in stats)
    new, n_empty = rq_stage_update(sums, counts, start)
    return new, counts, sse, n_empty


def faiss_one_lloyd_step(r: np.ndarray, init: np.ndarray) -> np.ndarray:
    km = faiss.Kmeans(r.shape[1], init.shape[0], niter=1, verbose=False)
    km.cp.max_points_per_centroid = 10**7  # no sub-sampling
    km.cp.min_points_per_centroid = 1
    km.train(r, init_centroids=np.ascontiguousarray(init))
    return km.centroids


@pytest.mark.parametrize("all_beams", [False, True], ids=["top_beam", "all_beams"])
def test_federated_rq_stage_step_equals_faiss_kmeans_step_on_union(x, rq_books, all_beams):
    """Sum of per-shard statistics, then means == one faiss k-means iteration on the union's
    stage-2 residuals from the same start (rtol 1e-5, atol 1e-6: faiss sums in float32)."""
    union = rq_residuals(x, rq_books[:2], BEAM, all_beams)
    k = rq_books.shape[1]
    rows = np.random.default_rng(1).choice(union.shape[0], size=k, replace=False)
    start = np.ascontiguousarray(union[rows])  # distinct residuals: no cell starts empty
    assert np.unique(start, axis=0).shape[0] == k
    new, counts, sse, n_empty = federated_stage_step(x, rq_books[:2], start, all_beams)
    assert n_empty == 0 and counts.sum() == union.shape[0]
    assert not np.allclose(new, start)
    np.testing.assert_allclose(new, faiss_one_lloyd_step(union, start), rtol=1e-5, atol=1e-6)
    index = faiss.IndexFlatL2(start.shape[1])
    index.add(start)
    dist, assign = index.search(union, 1)
    np.testing.assert_array_equal(counts, np.bincount(assign.ravel(), minlength=k))
    assert sse == pytest.approx(float(dist.astype(np.float64).sum()), rel=1e-6)


def test_empty_rq_cell_keeps_its_centroid(x, rq_books):
    union = rq_residuals(x, rq_books[:2], BEAM)
    k = rq_books.shape[1]
    start = np.ascontiguousarray(union[np.random.default_rng(1).choice(N, size=k, replace=False)])
    start[3] = 1e3  # far from every residual
    new, counts, _, n_empty = federated_stage_step(x, rq_books[:2], start, all_beams=False)
    assert counts[3] == 0 and n_empty == 1
    np.testing.assert_array_equal(new[3], start[3])
    sums_u, counts_u, _ = rq_stage_statistics(union, start)
    new_u, _ = rq_stage_update(sums_u, counts_u, start)
    np.testing.assert_array_equal(counts, counts_u)
    np.testing.assert_allclose(new, new_u, rtol=1e-6, atol=1e-7)  # float64 sums in another order


# ---------------------------------------------------------------------------- LSQ


@pytest.fixture(scope="module")
def lsq_trained(x) -> faiss.LocalSearchQuantizer:
    lsq = faiss.LocalSearchQuantizer(x.shape[1], 4, 6)
    lsq.train_iters = 4  # speed; the codes only need to be realistic
    lsq.train(x)
    return lsq


@pytest.fixture(scope="module")
def lsq_codes(x, lsq_trained) -> np.ndarray:
    return unpack_codes(lsq_trained, lsq_trained.compute_codes(x))  # [N, 4]


def faiss_update_codebooks(x: np.ndarray, codes: np.ndarray, m: int, nbits: int, lambd: float) -> np.ndarray:
    """faiss's own LocalSearchQuantizer::update_codebooks (double path, its default)."""
    lsq = faiss.LocalSearchQuantizer(x.shape[1], m, nbits)
    lsq.lambd = lambd
    assert lsq.update_codebooks_with_double
    k = 1 << nbits
    faiss.copy_array_to_vector(np.zeros(m * k * x.shape[1], np.float32), lsq.codebooks)  # it writes in place
    c = np.ascontiguousarray(codes, dtype=np.int32)
    lsq.update_codebooks(faiss.swig_ptr(x), faiss.swig_ptr(c), x.shape[0])
    return additive_codebooks(lsq)


def test_lsq_statistics_equal_dense_one_hot(x, lsq_codes):
    xs, cs = x[:300], lsq_codes[:300]
    btb, btx = lsq_normal_statistics(xs, cs, 4, 64)
    b = np.zeros((300, 4 * 64))
    b[np.arange(300)[:, None], cs + np.arange(4) * 64] = 1
    np.testing.assert_array_equal(btb, b.T @ b)
    np.testing.assert_allclose(btx, b.T @ xs.astype(np.float64), rtol=1e-12, atol=1e-12)
    assert (btb.diagonal().reshape(4, 64).sum(axis=1) == 300).all()  # one codeword per codebook


def test_federated_lsq_update_equals_union_solve_and_faiss(x, lsq_codes):
    perm = np.random.default_rng(2).permutation(N)
    stats = [lsq_normal_statistics(x[p], lsq_codes[p], 4, 64) for p in np.split(perm, CUTS)]
    btb = sum(s[0] for s in stats)
    btx = sum(s[1] for s in stats)
    btb_u, btx_u = lsq_normal_statistics(x, lsq_codes, 4, 64)
    np.testing.assert_array_equal(btb, btb_u)  # integer counts: exact
    np.testing.assert_allclose(btx, btx_u, rtol=1e-12, atol=1e-12)  # float64 sums, other order
    fed = lsq_solve(btb, btx, m=4)
    assert fed.shape == (4, 64, 50) and fed.dtype == np.float32
    np.testing.assert_allclose(fed, lsq_solve(btb_u, btx_u, m=4), rtol=1e-6, atol=1e-8)
    # faiss: (BᵀB + lambd I)^-1 BᵀX in double, cast to float32; here LU solve vs explicit inverse
    np.testing.assert_allclose(fed, faiss_update_codebooks(x, lsq_codes, 4, 6, LSQ_LAMBDA), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("lambd", [1.0, 50.0])
def test_lsq_regulariser_is_faiss_lambd_added_once(x, lsq_codes, lambd):
    """faiss adds ``lambd`` to the diagonal of the total BᵀB, unscaled by n: the server adds
    eta once to the summed statistics. (Large lambd makes a wrong scaling visible.)"""
    stats = [lsq_normal_statistics(s_x, s_c, 4, 64) for s_x, s_c in zip(np.split(x, CUTS), np.split(lsq_codes, CUTS))]
    fed = lsq_solve(sum(s[0] for s in stats), sum(s[1] for s in stats), lambd, m=4)
    np.testing.assert_allclose(fed, faiss_update_codebooks(x, lsq_codes, 4, 6, lambd), rtol=1e-6, atol=1e-8)
    per_client = lsq_solve(sum(s[0] for s in stats) + 2 * lambd * np.eye(256), sum(s[1] for s in stats), lambd, m=4)
    assert not np.allclose(per_client, fed, rtol=1e-4, atol=1e-6)  # eta per client would be another solve


# -------------------------------------------------------------- injected codebooks


ST = faiss.AdditiveQuantizer
SEARCH_TYPES = {"": ST.ST_decompress, "_Nfloat": ST.ST_norm_float, "_Nqint8": ST.ST_norm_qint8}


@pytest.fixture(scope="module")
def train_sample(x) -> np.ndarray:
    return np.ascontiguousarray(x[:2000])


def check_same_index(trained, injected, x, queries, quantizer_attr):
    assert injected.code_size == trained.code_size and injected.sa_code_size() == trained.sa_code_size()
    a, b = getattr(trained, quantizer_attr), getattr(injected, quantizer_attr)
    np.testing.assert_array_equal(b.compute_codes(x), a.compute_codes(x))
    np.testing.assert_array_equal(injected.sa_encode(x), trained.sa_encode(x))
    check_same_after_add(trained, injected, x, queries)


def check_same_after_add(ref, other, x, queries):
    """Both store the same codes for ``x`` and answer ``queries`` alike."""
    ref.add(x)
    other.add(x)
    np.testing.assert_array_equal(faiss.vector_to_array(other.codes), faiss.vector_to_array(ref.codes))
    d_r, i_r = ref.search(queries, 10)
    d_o, i_o = other.search(queries, 10)
    np.testing.assert_array_equal(i_o, i_r)
    np.testing.assert_allclose(d_o, d_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", list(SEARCH_TYPES))
def test_injected_rq_encodes_and_searches_like_trained_faiss(glove, train_sample, suffix):
    x, queries = glove
    factory = faiss.index_factory(50, "RQ4x6" + suffix)  # owns the C++ object: keep it alive
    trained = faiss.downcast_index(factory)
    assert trained.rq.search_type == SEARCH_TYPES[suffix]
    trained.train(train_sample)
    rq = trained.rq
    norm_range = (rq.norm_min, rq.norm_max) if suffix == "_Nqint8" else None
    books = additive_codebooks(rq)
    assert books.shape == (4, 64, 50)
    injected = additive_index("rq", books, search_type=SEARCH_TYPES[suffix], norm_range=norm_range, beam_size=rq.max_beam_size)
    check_same_index(trained, injected, x, queries, "rq")
    alone = rq_from_codebooks(books, rq.max_beam_size, SEARCH_TYPES[suffix], norm_range)
    np.testing.assert_array_equal(alone.compute_codes(x), rq.compute_codes(x))


@pytest.mark.parametrize("suffix", list(SEARCH_TYPES))
def test_injected_lsq_encodes_and_searches_like_trained_faiss(glove, train_sample, suffix):
    x, queries = np.ascontiguousarray(glove[0][:1500]), glove[1]  # ILS encoding is the slow part
    factory = faiss.index_factory(50, "LSQ4x6" + suffix)  # owns the C++ object: keep it alive
    trained = faiss.downcast_index(factory)
    trained.lsq.train_iters = 4  # speed
    trained.train(train_sample)
    lsq = trained.lsq
    norm_range = (lsq.norm_min, lsq.norm_max) if suffix == "_Nqint8" else None
    # LSQ encoding is randomized (random start codes, then ILS perturbations), but faiss
    # seeds a fresh std::mt19937 with ``random_seed`` inside every compute_codes call, so
    # with equal seeds, equal encode_ils_iters and the same batch both sides draw the same
    # numbers and give the same bytes. (nperts/icm_iters/chunk_size are faiss defaults on
    # both sides; train() clamps nperts to M, lsq_from_codebooks does the same.)
    injected = additive_index(
        "lsq",
        additive_codebooks(lsq),
        search_type=SEARCH_TYPES[suffix],
        norm_range=norm_range,
        encode_ils_iters=lsq.encode_ils_iters,
        random_seed=lsq.random_seed,
    )
    check_same_index(trained, injected, x, queries, "lsq")
    alone = lsq_from_codebooks(additive_codebooks(lsq), lsq.encode_ils_iters, SEARCH_TYPES[suffix], norm_range, lsq.random_seed)
    np.testing.assert_array_equal(alone.compute_codes(x), lsq.compute_codes(x))


@pytest.mark.parametrize("kind", ["rq", "lsq"])
def test_norm_from_lut_searches_like_decompress(glove, rq_books, lsq_trained, kind):
    """ST_norm_from_LUT (no extra bytes: ||recon||^2 from codebook cross products, which
    injection computes as faiss's train does) ranks like exact decompression."""
    x, queries = np.ascontiguousarray(glove[0][:1500]), glove[1]
    books = rq_books if kind == "rq" else additive_codebooks(lsq_trained)
    exact = additive_index(kind, books)
    lut = additive_index(kind, books, search_type=ST.ST_norm_from_LUT)
    assert lut.code_size == exact.code_size == (books.shape[0] * 6 + 7) // 8
    check_same_after_add(exact, lut, x, queries)


def test_lsq_encoding_depends_on_seed_not_on_call(x, lsq_trained):
    books = additive_codebooks(lsq_trained)
    a = lsq_from_codebooks(books, 4, random_seed=7)
    np.testing.assert_array_equal(a.compute_codes(x[:500]), a.compute_codes(x[:500]))
    b = lsq_from_codebooks(books, 4, random_seed=8)
    assert not np.array_equal(a.compute_codes(x[:500]), b.compute_codes(x[:500]))


# ---------------------------------------------------------------------- refusals


def test_refusals(x, rq_books):
    with pytest.raises(VectorError, match="power of 2"):
        rq_from_codebooks(np.zeros((2, 48, 50), np.float32))
    with pytest.raises(VectorError, match="norm_range"):
        rq_from_codebooks(rq_books, search_type=ST.ST_norm_qint8)
    with pytest.raises(VectorError, match="cannot be injected"):
        lsq_from_codebooks(rq_books, search_type=ST.ST_norm_cqint8)
    with pytest.raises(VectorError, match="kind"):
        additive_index("pq", rq_books)
    with pytest.raises(VectorError, match="d=50"):
        rq_residuals(x[:, :16].copy(), rq_books[:1])
    with pytest.raises(VectorError, match="codes"):
        lsq_normal_statistics(x[:10], np.full((10, 4), 64), 4, 64)
    with pytest.raises(VectorError, match="eta"):
        lsq_solve(np.eye(8), np.zeros((8, 3)), 0.0, m=2)


# ------------------------------------------- the federation's step: one codebook per round


@pytest.mark.parametrize("stage", [0, 2])
def test_federated_block_step_equals_union_least_squares_block(x, lsq_trained, lsq_codes, stage):
    """The federation's update of one codebook (sums and counts of its targets, summed
    over uneven shards) is the exact least-squares solution for that codebook on the
    union, the others and the codes fixed: from the union's normal equations,
    C_s = D_s^-1 (BᵀX_s - sum_{j != s} (BᵀB)_{sj} C_j)."""
    books = additive_codebooks(lsq_trained)
    m, k, d = books.shape
    perm = np.random.default_rng(2).permutation(N)
    parts = [block_statistics(block_targets(x[p], books, lsq_codes[p], stage), lsq_codes[p, stage], k) for p in np.split(perm, CUTS)]
    sums, counts = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert sums.shape == (1, k, d) and counts.shape == (1, k)
    filled = counts[0] > 0
    fed = sums[0, filled] / counts[0, filled, None]

    btb, btx = lsq_normal_statistics(x, lsq_codes, m, k)
    rows = slice(stage * k, (stage + 1) * k)
    rhs = btx[rows] - sum(btb[rows, j * k : (j + 1) * k] @ books[j].astype(np.float64) for j in range(m) if j != stage)
    diag = btb[rows, rows].diagonal()
    np.testing.assert_array_equal(diag, counts[0])
    np.testing.assert_allclose(fed, rhs[filled] / diag[filled, None], rtol=1e-5, atol=1e-6)

    # and it is the best codebook s: distortion with the codes fixed does not rise
    def distortion(b):
        return float(((x - sum(b[j][lsq_codes[:, j]] for j in range(m))) ** 2).sum())

    new = books.copy()
    new[stage, filled] = fed.astype(np.float32)
    assert distortion(new) <= distortion(books) * (1 + 1e-6)


def test_block_targets_of_rq_stage_are_residuals_plus_the_codeword(x, rq_books):
    """For the last RQ stage the target is the residual after all stages plus its own codeword."""
    rq = rq_from_codebooks(rq_books, BEAM)
    codes = unpack_codes(rq, rq.compute_codes(x))
    last = rq_books.shape[0] - 1
    t = block_targets(x, rq_books, codes, last)
    np.testing.assert_allclose(t, x - rq.decode(rq.compute_codes(x)) + rq_books[last][codes[:, last]], rtol=1e-5, atol=1e-5)


def test_round_plan_trains_stages_in_order_then_cycles_block_updates():
    assert [round_plan(r, 3) for r in range(1, 5)] == [(0, False), (1, False), (2, False), (0, False)]
    assert round_plan(0, 3) == (0, False)  # round 0 (the init) counts as the first
    greedy = [round_plan(r, 3, 2) for r in range(1, 10)]
    assert greedy == [(0, True), (0, True), (1, True), (1, True), (2, True), (2, True), (0, False), (1, False), (2, False)]
