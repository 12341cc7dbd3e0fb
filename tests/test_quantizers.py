"""Injected codebooks (vector_index.quantizers) encode and search exactly like trained faiss."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from vector_index.quantizers import (
    IndexSpec,
    build_index,
    build_index_with_errors,
    make_product_quantizer,
    reconstruct,
    reference_codebooks,
    residuals,
    sa_codes,
    split_subspaces,
    squared_errors,
    train_additive,
    train_reference_index,
)
from vector_index.validation import VectorError

N, NQ, D, M, NBITS, NLIST = 2000, 50, 16, 4, 6, 8
K = 1 << NBITS
DSUB = D // M


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, D)).astype(np.float32)
    labels = rng.integers(12, size=N + NQ)
    x = (centres[labels] + 0.4 * rng.normal(size=(N + NQ, D))).astype(np.float32)
    return np.ascontiguousarray(x[:N]), np.ascontiguousarray(x[N:])


@pytest.fixture(scope="module")
def trained_pq(data) -> faiss.IndexPQ:
    x, _ = data
    index = faiss.IndexPQ(D, M, NBITS)
    index.pq.cp.seed = 1
    index.train(x)
    index.add(x)
    return index


@pytest.fixture(scope="module")
def trained_ivfpq(data) -> faiss.IndexIVFPQ:
    x, _ = data
    quantizer = faiss.IndexFlatL2(D)
    index = faiss.IndexIVFPQ(quantizer, D, NLIST, M, NBITS)
    index.cp.seed = 1
    index.pq.cp.seed = 1
    index.train(x)
    index.add(x)
    index.nprobe = 3
    assert index.by_residual
    return index


def pq_codebook(pq: faiss.ProductQuantizer) -> np.ndarray:
    return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def test_injected_quantizer_encodes_byte_for_byte(data, trained_pq):
    x, q = data
    cb = pq_codebook(trained_pq.pq)
    assert cb.shape == (M, K, DSUB)
    pq = make_product_quantizer(cb)
    assert (pq.M, pq.nbits, pq.dsub) == (M, NBITS, DSUB)
    np.testing.assert_array_equal(pq_codebook(pq), cb)
    for v in (x, q):
        np.testing.assert_array_equal(pq.compute_codes(v), trained_pq.pq.compute_codes(v))


def test_injected_pq_index_searches_identically(data, trained_pq):
    x, q = data
    cb = pq_codebook(trained_pq.pq)
    index = build_index(IndexSpec("pq", m=M, nbits=NBITS), x, np.arange(N), {"pq": cb})
    assert index.ntotal == N
    stored = faiss.vector_to_array(faiss.downcast_index(index.index).codes)
    np.testing.assert_array_equal(stored, faiss.vector_to_array(trained_pq.codes))
    d_ref, i_ref = trained_pq.search(q, 10)
    d, i = index.search(q, 10)
    np.testing.assert_array_equal(i, i_ref)
    # same codes; the distance tables differ only in float summation order
    # (injection fills pq.transposed_centroids, training does not)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)


def test_injected_pq_index_reports_given_ids(data, trained_pq):
    x, q = data
    cb = pq_codebook(trained_pq.pq)
    ids = np.arange(N, dtype=np.int64) * 7 + 1000
    index = build_index(IndexSpec("pq", m=M, nbits=NBITS), x, ids, {"pq": cb})
    _, i_ref = trained_pq.search(q, 5)
    _, i = index.search(q, 5)
    np.testing.assert_array_equal(i, ids[i_ref])


def ivfpq_codebooks(index: faiss.IndexIVFPQ) -> dict[str, np.ndarray]:
    coarse = index.quantizer.reconstruct_n(0, index.nlist)
    return {"coarse": coarse[None].astype(np.float32), "pq": pq_codebook(index.pq)}


def test_injected_ivfpq_index_searches_identically(data, trained_ivfpq):
    x, q = data
    cbs = ivfpq_codebooks(trained_ivfpq)
    assert cbs["coarse"].shape == (1, NLIST, D)
    spec = IndexSpec("ivfpq", m=M, nbits=NBITS, nlist=NLIST, nprobe=3)
    index = build_index(spec, x, np.arange(N), cbs)
    assert index.ntotal == N
    ivf = faiss.extract_index_ivf(index)
    for lst in range(NLIST):  # same vectors in the same lists, with the same codes
        assert ivf.invlists.list_size(lst) == trained_ivfpq.invlists.list_size(lst)
        n = ivf.invlists.list_size(lst)
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(lst), n * ivf.code_size).copy()
        ref = faiss.rev_swig_ptr(trained_ivfpq.invlists.get_codes(lst), n * ivf.code_size).copy()
        np.testing.assert_array_equal(codes, ref)
    d_ref, i_ref = trained_ivfpq.search(q, 10)
    d, i = index.search(q, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)


def test_injected_ivfflat_index_searches_identically(data, trained_ivfpq):
    """IVF-Flat from federated coarse centroids: the same lists and the same answers as
    faiss's IVF-Flat trained to those centroids."""
    x, q = data
    coarse = ivfpq_codebooks(trained_ivfpq)["coarse"]
    ref = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, NLIST)
    ref.quantizer.add(coarse[0])
    ref.is_trained = True
    ref.add(x)
    ref.nprobe = 3
    spec = IndexSpec("ivfflat", nlist=NLIST, nprobe=3)
    assert spec.levels == ("coarse",) and spec.factory_string() == f"IVF{NLIST},Flat" and spec.code_size(D) == 4 * D
    index = build_index(spec, x, np.arange(N), {"coarse": coarse})
    ivf = faiss.extract_index_ivf(index)
    for lst in range(NLIST):
        assert ivf.invlists.list_size(lst) == ref.invlists.list_size(lst)
    d_ref, i_ref = ref.search(q, 10)
    d, i = index.search(q, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref)


def test_ivfpq_nprobe_is_applied(data, trained_ivfpq):
    x, q = data
    cbs = ivfpq_codebooks(trained_ivfpq)
    index = build_index(IndexSpec("ivfpq", m=M, nbits=NBITS, nlist=NLIST, nprobe=NLIST), x, np.arange(N), cbs)
    assert faiss.extract_index_ivf(index).nprobe == NLIST


def test_pq_reconstruction_error_equals_faiss(data, trained_pq):
    x, _ = data
    cb = pq_codebook(trained_pq.pq)
    ref = trained_pq.pq.decode(trained_pq.pq.compute_codes(x))
    np.testing.assert_allclose(reconstruct(x, {"pq": cb}), ref, rtol=1e-6, atol=1e-6)
    err = squared_errors(x, {"pq": cb})
    assert err.shape == (N,)
    np.testing.assert_allclose(err, ((x - ref) ** 2).sum(axis=1), rtol=1e-5, atol=1e-6)
    assert err.mean() > 0


def test_ivfpq_reconstruction_error_equals_faiss(data, trained_ivfpq):
    x, _ = data
    cbs = ivfpq_codebooks(trained_ivfpq)
    ref = np.zeros_like(x)
    trained_ivfpq.make_direct_map()
    for row in range(N):
        ref[row] = trained_ivfpq.reconstruct(row)
    np.testing.assert_allclose(reconstruct(x, cbs), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(squared_errors(x, cbs), ((x - ref) ** 2).sum(axis=1), rtol=1e-4, atol=1e-5)
    # the coarse level alone is a much worse reconstruction than coarse + PQ
    assert squared_errors(x, {"coarse": cbs["coarse"]}).mean() > squared_errors(x, cbs).mean()


@pytest.mark.parametrize("kind", ["pq", "ivfpq", "hnswpq"])
def test_index_and_errors_from_one_encoding_equal_the_two_apart(data, trained_pq, trained_ivfpq, kind):
    """The simulator's truth encodes 100k vectors once per evaluation, not twice: the index
    filled from the codes and the errors from decoding them are bit for bit those of
    build_index and squared_errors."""
    x, q = data
    books = ivfpq_codebooks(trained_ivfpq) if kind == "ivfpq" else {"pq": pq_codebook(trained_pq.pq)}
    spec = IndexSpec(kind, m=M, nbits=NBITS, nlist=NLIST, nprobe=3) if kind == "ivfpq" else IndexSpec(kind, m=M, nbits=NBITS)
    ids = np.arange(N, dtype=np.int64) * 3
    index, errors = build_index_with_errors(spec, x, ids, books)
    d_ref, i_ref = build_index(spec, x, ids, books).search(q, 10)
    d, i = index.search(q, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(errors, squared_errors(x, books))


def test_residuals_are_relative_to_nearest_coarse_centroid(data, trained_ivfpq):
    x, _ = data
    coarse = ivfpq_codebooks(trained_ivfpq)["coarse"]
    r = residuals(x, coarse)
    _, assign = trained_ivfpq.quantizer.search(x, 1)
    np.testing.assert_allclose(r, x - coarse[0][assign.ravel()], rtol=1e-6, atol=1e-6)


def test_flat_reconstruction_is_exact(data):
    x, _ = data
    assert squared_errors(x, {}).max() == 0.0


def test_split_subspaces_layout():
    x = np.arange(2 * 8, dtype=np.float32).reshape(2, 8)
    s = split_subspaces(x, 4)
    assert s.shape == (4, 2, 2)
    np.testing.assert_array_equal(s[1, 0], [2, 3])
    np.testing.assert_array_equal(s[3, 1], [14, 15])
    assert s.flags["C_CONTIGUOUS"]


def test_non_power_of_two_codebook_is_refused():
    with pytest.raises(VectorError, match="power of 2"):
        make_product_quantizer(np.zeros((4, 10, 4), dtype=np.float32))


def test_codebook_of_wrong_shape_is_refused(data):
    x, _ = data
    with pytest.raises(VectorError, match="does not match"):
        build_index(IndexSpec("pq", m=M, nbits=NBITS), x, np.arange(N), {"pq": np.zeros((M, K, DSUB + 1), np.float32)})


def test_index_spec_geometry():
    spec = IndexSpec("ivfpq", m=M, nbits=NBITS, nlist=NLIST)
    assert spec.levels == ("coarse", "pq")
    assert spec.level_shape("coarse", D) == (1, NLIST, D)
    assert spec.level_shape("pq", D) == (M, K, DSUB)
    assert spec.code_size(D) == (M * NBITS + 7) // 8
    with pytest.raises(VectorError, match="nlist >= 1"):
        IndexSpec("ivfpq", m=M, nbits=NBITS, nlist=0)


@pytest.mark.parametrize("kind", ["rq", "lsq"])
def test_injected_additive_index_encodes_and_searches_like_the_reference(data, kind):
    """index=rq/lsq: faiss's own RQ/LSQ trained centrally (the reference), its codebooks
    taken out and injected into a shard's index: the same codes, the same answers, and
    the same squared errors through every path (reconstruct, one encoding for both)."""
    x, q = data
    spec = IndexSpec(kind, m=3, nbits=NBITS, beam_size=4, ils_iters=6)
    assert spec.levels == (kind,) and spec.level_shape(kind, D) == (3, K, D)
    assert spec.factory_string() == f"{kind.upper()}3x{NBITS}" and spec.code_size(D) == (3 * NBITS + 7) // 8
    ref = train_reference_index(spec, x, seed=1)
    books, transform = reference_codebooks(spec, ref)
    assert transform is None and books[kind].shape == (3, K, D)
    index = build_index(spec, x, np.arange(N), books)
    np.testing.assert_array_equal(sa_codes(index, x), faiss.downcast_index(ref).sa_encode(x))
    d_ref, i_ref = ref.search(q, 10)
    d, i = index.search(q, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
    recon = faiss.downcast_index(ref).sa_decode(faiss.downcast_index(ref).sa_encode(x))
    err = squared_errors(x, books, spec)
    np.testing.assert_allclose(err, ((x - recon) ** 2).sum(axis=1), rtol=1e-5, atol=1e-6)
    index2, err2 = build_index_with_errors(spec, x, np.arange(N), books)
    np.testing.assert_array_equal(err2, ((x - recon) ** 2).sum(axis=1))
    assert index2.ntotal == N
    np.testing.assert_array_equal(index2.search(q, 10)[1], i_ref)
    flat, err3 = build_index_with_errors(spec, x, np.arange(N), books, decoded_search=True)
    np.testing.assert_array_equal(err3, err2)
    d_flat, i_flat = flat.search(q, 10)
    np.testing.assert_allclose(d_flat, d_ref, rtol=1e-4, atol=1e-5)  # the same distances, by BLAS
    assert (i_flat == i_ref).mean() > 0.99  # ties and float rounding may swap a neighbour


def test_additive_codebooks_are_checked(data):
    spec = IndexSpec("rq", m=3, nbits=NBITS)
    with pytest.raises(VectorError, match="level 'rq'"):
        build_index(spec, data[0], np.arange(N), {"rq": np.zeros((3, K, D + 1), np.float32)})
    with pytest.raises(VectorError, match="needs codebook level"):
        build_index(spec, data[0], np.arange(N), {"pq": np.zeros((3, K, D), np.float32)})
    with pytest.raises(VectorError, match="beam_size"):
        IndexSpec("rq", m=3, nbits=NBITS, beam_size=0)


def test_public_init_of_lsq_is_faiss_rq_on_the_same_vectors(data):
    """LSQ starts from faiss's RQ codebooks (its own least squares overfits a small public
    sample); the shard then encodes them with LSQ's ICM."""
    x, _ = data
    rq = train_additive(IndexSpec("rq", m=3, nbits=NBITS), x[:500], seed=1)
    lsq = train_additive(IndexSpec("lsq", m=3, nbits=NBITS), x[:500], seed=1)
    np.testing.assert_array_equal(lsq, rq)
    assert rq.shape == (3, K, D)
    assert squared_errors(x, {"lsq": lsq}, IndexSpec("lsq", m=3, nbits=NBITS)).mean() < (x**2).sum(axis=1).mean() / 4
