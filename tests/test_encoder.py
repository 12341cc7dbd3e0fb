"""The shared linear encoder (fed_app.encoder): identity at start, trains, rotations stay orthogonal."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from fed_app.encoder import (
    ROTATION_KEY,
    Encoder,
    TrainSettings,
    affine_of,
    encode,
    initial_weights,
    load_encoder,
    train_encoder,
)
from fed_app.experiment import ENCODER_KINDS
from vector_index.quantizers import make_product_quantizer, squared_errors

N, D, M, NBITS = 512, 16, 4, 4


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, D)).astype(np.float32)
    # correlated dimensions: a rotation can help PQ here
    mix = rng.normal(size=(D, D)).astype(np.float32) / np.sqrt(D)
    labels = rng.integers(8, size=N)
    return np.ascontiguousarray(((centres[labels] + 0.3 * rng.normal(size=(N, D))) @ mix).astype(np.float32))


@pytest.fixture(scope="module")
def codebook(x) -> np.ndarray:
    pq = faiss.ProductQuantizer(D, M, NBITS)
    pq.cp.seed = 0
    pq.train(x)
    return faiss.vector_to_array(pq.centroids).reshape(M, 1 << NBITS, D // M)


def settings(**kw) -> TrainSettings:
    base = dict(epochs=1, batch_size=64, lr=0.01, lam=0.0, gamma=0.0, proximal_mu=0.0, seed=0)
    base.update(kw)
    return TrainSettings(**base)


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_initial_encoder_is_identity(x, kind):
    w = initial_weights(D, kind)
    assert (ROTATION_KEY in w) == (kind == "rotation")
    z = encode(load_encoder(w), x)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z, x, rtol=1e-5, atol=1e-5)
    a, b = affine_of(w)
    np.testing.assert_allclose(a, np.eye(D), atol=1e-6)
    np.testing.assert_array_equal(b, np.zeros(D))


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_identity_encoder_gives_plain_pq_codes(x, codebook, kind):
    z = encode(load_encoder(initial_weights(D, kind)), x)
    pq = make_product_quantizer(codebook)
    np.testing.assert_array_equal(pq.compute_codes(z), pq.compute_codes(x))


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_zero_weights_leave_the_identity_in_place(x, codebook, kind):
    w0 = initial_weights(D, kind)
    w1, losses = train_encoder(w0, x, [codebook], settings(lam=0.0, gamma=0.0))
    # task loss is zero at the identity and its gradient too: nothing moves
    for key in w0:
        np.testing.assert_allclose(w1[key], w0[key], atol=1e-6)
    assert losses["task_loss"] == pytest.approx(0.0, abs=1e-6)
    pq = make_product_quantizer(codebook)
    np.testing.assert_array_equal(pq.compute_codes(encode(load_encoder(w1), x)), pq.compute_codes(x))


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_training_with_lam_moves_weights_and_lowers_distortion(x, codebook, kind):
    w0 = initial_weights(D, kind)
    before = squared_errors(encode(load_encoder(w0), x), {"pq": codebook}).mean()
    w1, losses = train_encoder(w0, x, [codebook], settings(lam=10.0, epochs=2))
    assert set(losses) == {"task_loss", "pq_loss", "l1_loss"}
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["pq_loss"] > 0
    assert any(not np.allclose(w1[k], w0[k]) for k in w0)
    after = squared_errors(encode(load_encoder(w1), x), {"pq": codebook}).mean()
    assert after < before
    # the input weights are not modified in place
    np.testing.assert_allclose(affine_of(w0)[0], np.eye(D), atol=1e-6)


def test_rotation_stays_orthogonal_after_training(x, codebook):
    w1, _ = train_encoder(initial_weights(D, "rotation"), x, [codebook], settings(lam=10.0, lr=0.05, epochs=2))
    a, b = affine_of(w1)
    assert not np.allclose(a, np.eye(D), atol=1e-3)  # it did rotate
    np.testing.assert_allclose(a.T @ a, np.eye(D), atol=1e-4)
    np.testing.assert_array_equal(b, np.zeros(D))
    # a rotation preserves distances exactly, so its encoding does too
    z = encode(load_encoder(w1), x[:50])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), np.linalg.norm(x[:50], axis=1), rtol=1e-4)


def test_affine_of_matches_encode(x, codebook):
    w1, _ = train_encoder(initial_weights(D, "affine"), x, [codebook], settings(lam=10.0, gamma=0.1))
    a, b = affine_of(w1)
    np.testing.assert_allclose(encode(load_encoder(w1), x), x @ a.T + b, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic_under_seed(x, codebook):
    w0 = initial_weights(D, "affine")
    a, _ = train_encoder(w0, x, [codebook], settings(lam=10.0, seed=3))
    b, _ = train_encoder(w0, x, [codebook], settings(lam=10.0, seed=3))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_proximal_term_keeps_weights_closer(x, codebook):
    w0 = initial_weights(D, "affine")
    free, _ = train_encoder(w0, x, [codebook], settings(lam=10.0, epochs=2))
    prox, _ = train_encoder(w0, x, [codebook], settings(lam=10.0, epochs=2, proximal_mu=100.0))
    dist = lambda w: float(np.linalg.norm(w["linear.weight"] - w0["linear.weight"]))  # noqa: E731
    assert dist(prox) < dist(free)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="encoder kind 'mlp'"):
        Encoder(D, "mlp")


@pytest.mark.parametrize("kind", ["rotation", "affine"])
def test_encode_weights_equals_the_torch_module_bit_for_bit(kind):
    """The cached (A, b) path gives exactly the module's output (secure and plain sums must agree)."""
    from fed_app.encoder import Encoder, encode, encode_weights, load_encoder, weights_of

    torch.manual_seed(3)
    model = Encoder(12, kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = weights_of(model)
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    np.testing.assert_array_equal(encode_weights(weights, x), encode(load_encoder(weights), x))
    np.testing.assert_array_equal(encode_weights(weights, x), encode_weights(weights, x))  # from the cache


@pytest.mark.parametrize("kind", ["rotation", "affine"])
def test_training_on_a_reused_module_equals_a_fresh_one(kind, x, codebook):
    """Clients train in a module kept per process; another client's training in between changes nothing."""
    other = np.ascontiguousarray(x[::-1][:150] * 1.5)
    first = train_encoder(initial_weights(D, kind), x, [codebook], settings(epochs=2, lam=1.0))
    train_encoder(first[0], other, [codebook], settings(epochs=1, lr=0.1, lam=1.0))
    again = train_encoder(initial_weights(D, kind), x, [codebook], settings(epochs=2, lam=1.0))
    for key in first[0]:
        np.testing.assert_array_equal(first[0][key], again[0][key])
    assert first[1] == again[1]
