"""Bad input is refused with a message naming the problem, and nothing is half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_app.config import ConfigError, compose_config, validate
from fed_app.lloyd import local_centroids, lloyd_statistics
from vector_index.datasets import load_npy, load_npy_file
from vector_index.partition import iid
from vector_index.quantizers import IndexSpec, build_index
from vector_index.validation import VectorError, check_pq_geometry, check_vectors

D = 16


def vectors(n: int = 20, d: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# ---------------------------------------------------------------- vectors


def test_wrong_dimension():
    with pytest.raises(VectorError, match=r"queries: dimension 8 does not match expected 16"):
        check_vectors(vectors(d=8), dim=D, name="queries")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float16])
def test_unsupported_dtype(dtype):
    with pytest.raises(VectorError, match=rf"dtype {np.dtype(dtype).name} is not supported; use float32"):
        check_vectors(np.ones((4, D), dtype=dtype))


def test_float64_is_accepted_and_converted():
    x = vectors().astype(np.float64)
    out = check_vectors(x, dim=D)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, x, rtol=1e-6)
    assert x.dtype == np.float64  # the caller's array is untouched


def test_non_array_and_wrong_rank():
    with pytest.raises(VectorError, match="expected a numpy array, got list"):
        check_vectors([[1.0, 2.0]])
    with pytest.raises(VectorError, match=r"expected a 2-D array \[n, d\], got shape \(16,\)"):
        check_vectors(np.ones(D, dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(bad):
    x = vectors()
    x[3, 5] = bad
    x[11, 0] = bad
    before = x.copy()
    with pytest.raises(VectorError, match=r"2 vector\(s\) contain NaN or inf \(first rows: \[3, 11\]\)"):
        check_vectors(x)
    np.testing.assert_array_equal(x, before)


def test_empty_shard():
    with pytest.raises(VectorError, match=r"shard: empty \(0 vectors\)"):
        check_vectors(np.zeros((0, D), dtype=np.float32), name="shard")


# ---------------------------------------------------- vectors into the numerics


def codebook(m: int = 4, k: int = 8) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(m, k, D // m)).astype(np.float32)


def test_lloyd_statistics_refuses_wrong_dimension():
    with pytest.raises(VectorError, match="shard vectors: dimension 15 does not match expected 16"):
        lloyd_statistics(vectors(d=15), codebook())
    with pytest.raises(VectorError, match="shard vectors: dimension 20 does not match expected 16"):
        lloyd_statistics(vectors(d=20), codebook())


def test_lloyd_statistics_refuses_nan_int_and_empty():
    x = vectors()
    x[7] = np.nan
    with pytest.raises(VectorError, match="NaN or inf"):
        lloyd_statistics(x, codebook())
    with pytest.raises(VectorError, match="dtype int64 is not supported"):
        lloyd_statistics(np.ones((5, D), dtype=np.int64), codebook())
    with pytest.raises(VectorError, match=r"empty \(0 vectors\)"):
        lloyd_statistics(np.zeros((0, D), dtype=np.float32), codebook())


def test_local_centroids_refuses_bad_shards():
    x = vectors()
    x[2, 2] = np.inf
    with pytest.raises(VectorError, match="NaN or inf"):
        local_centroids(x, 4, 8, niter=2, seed=0)
    with pytest.raises(VectorError, match=r"empty \(0 vectors\)"):
        local_centroids(np.zeros((0, D), dtype=np.float32), 4, 8, niter=2, seed=0)
    with pytest.raises(VectorError, match="dimension d=16 is not divisible by M=5"):
        local_centroids(vectors(), 5, 8, niter=2, seed=0)


def test_partition_of_too_few_vectors():
    with pytest.raises(VectorError, match="num_clients=30 exceeds the 20 base vectors"):
        iid(vectors(), 30, seed=0)


# ---------------------------------------------------------------- PQ geometry


def test_dimension_not_divisible_by_m():
    with pytest.raises(VectorError, match=r"dimension d=16 is not divisible by M=5 \(d % M = 1\)"):
        check_pq_geometry(16, 5, 8)
    with pytest.raises(VectorError, match="not divisible by M=5"):
        IndexSpec("pq", m=5, nbits=4).level_shape("pq", 16)


@pytest.mark.parametrize("nbits", [0, 17, -1])
def test_nbits_out_of_range(nbits):
    with pytest.raises(VectorError, match=rf"nbits={nbits} is out of range; use 1\.\.16"):
        check_pq_geometry(16, 4, nbits)
    with pytest.raises(VectorError, match=rf"nbits={nbits} is out of range"):
        IndexSpec("pq", m=4, nbits=nbits).level_shape("pq", 16)


@pytest.mark.parametrize("nbits", [1, 16])
def test_nbits_bounds_are_accepted(nbits):
    check_pq_geometry(16, 4, nbits)  # no error


def test_m_zero():
    with pytest.raises(VectorError, match="M=0 must be >= 1"):
        check_pq_geometry(16, 0, 8)


def test_build_index_with_codebook_for_other_dimension():
    x = vectors()
    with pytest.raises(VectorError, match="does not match"):
        build_index(IndexSpec("pq", m=4, nbits=3), x, np.arange(20), {"pq": np.zeros((4, 8, 3), np.float32)})
    with pytest.raises(VectorError, match="not divisible by M=5"):
        build_index(IndexSpec("pq", m=5, nbits=3), x, np.arange(20), {"pq": np.zeros((5, 8, 3), np.float32)})


# ---------------------------------------------------------------- .npy files


def test_missing_npy(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(VectorError, match=r"base vectors: file '.*nope\.npy' does not exist"):
        load_npy(missing, num_queries=10, seed=0)
    with pytest.raises(VectorError, match=r"does not exist"):
        load_npy_file(missing)
    assert not missing.exists()


def test_missing_query_npy(tmp_path):
    base = tmp_path / "base.npy"
    np.save(base, vectors(50))
    with pytest.raises(VectorError, match=r"query vectors: file '.*q\.npy' does not exist"):
        load_npy(base, num_queries=10, seed=0, query_path=tmp_path / "q.npy")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(VectorError, match="is not a file"):
        load_npy_file(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is text, not numpy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (100, 16), }"],
    ids=["empty-file", "text", "truncated"],
)
def test_unreadable_npy(tmp_path, content):
    p = tmp_path / "bad.npy"
    p.write_bytes(content)
    with pytest.raises(VectorError, match=r"is not a readable \.npy array"):
        load_npy_file(p)


def test_object_npy_is_refused_without_unpickling(tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VectorError, match=r"is not a readable \.npy array"):
        load_npy_file(p)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.ones((10, D), dtype=np.int64), "dtype int64 is not supported"),
        (np.ones(D, dtype=np.float32), "expected a 2-D array"),
        (np.zeros((0, D), dtype=np.float32), r"empty \(0 vectors\)"),
        (np.full((10, D), np.nan, dtype=np.float32), "10 vector\\(s\\) contain NaN or inf"),
        (np.where(np.arange(10)[:, None] == 4, 1e300, np.ones((10, D))), r"1 vector\(s\) too large for float32 \(largest \|value\| 1e\+300"),
    ],
    ids=["int", "1-d", "empty", "nan", "float64-1e300"],
)
def test_bad_npy_content(tmp_path, array, message):
    p = tmp_path / "vecs.npy"
    np.save(p, array)
    with pytest.raises(VectorError, match=rf"base vectors \(.*vecs\.npy\): {message}"):
        load_npy(p, num_queries=2, seed=0)


def test_query_file_of_other_dimension(tmp_path):
    np.save(tmp_path / "b.npy", vectors(50))
    np.save(tmp_path / "q.npy", vectors(5, d=8))
    with pytest.raises(VectorError, match="query vectors: dimension 8 does not match base dimension 16"):
        load_npy(tmp_path / "b.npy", num_queries=0, seed=0, query_path=tmp_path / "q.npy")


def test_more_queries_than_vectors(tmp_path):
    np.save(tmp_path / "b.npy", vectors(50))
    with pytest.raises(VectorError, match="num_queries=50 leaves no base vectors out of 50"):
        load_npy(tmp_path / "b.npy", num_queries=50, seed=0)


def test_good_npy_loads(tmp_path):
    x = vectors(50).astype(np.float64)
    np.save(tmp_path / "b.npy", x)
    ds = load_npy(tmp_path / "b.npy", num_queries=10, seed=0)
    assert ds.base.shape == (40, D) and ds.queries.shape == (10, D)
    assert ds.base.dtype == ds.queries.dtype == np.float32


# ---------------------------------------------------------------- configuration

SYNTH = ["data=synthetic", "data.num_base=1500", "data.num_queries=100"]


@pytest.fixture(scope="module")
def good_cfg() -> dict:
    return compose_config([*SYNTH, "index.m=4", "index.nbits=6"])


def test_good_config_passes(good_cfg):
    validate(good_cfg, D, 1500)  # no error


@pytest.mark.parametrize(
    "overrides, key, why",
    [
        (["index.m=5"], "index.m", "dimension 16 is not divisible by M=5"),
        (["index.m=0"], "index.m", "must be >= 1"),
        (["index.nbits=0"], "index.nbits", "must be >= 1, got 0"),
        (["index.nbits=17"], "index.nbits", "must be <= 16, got 17"),
        (["index.nbits=12"], "index.nbits", "2\\^12 centroids but only 1500 vectors"),
        (["num_clients=0"], "num_clients", "must be >= 1, got 0"),
        (["num_clients=2000"], "num_clients", "2000 clients but only 1500 base vectors"),
        (["fraction_train=0"], "fraction_train", "must be > 0, got 0"),
        (["fraction_train=1.5"], "fraction_train", "must be <= 1, got 1.5"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha", "must be > 0, got 0"),
        (["partition=dirichlet", "partition.alpha=-0.5"], "partition.alpha", "must be > 0, got -0.5"),
        (["data.num_queries=0"], "data.num_queries", "must be >= 1, got 0"),
        (["eval.every=0"], "eval.every", "must be >= 1, got 0"),
        (["init.local_k=0"], "init.local_k", "must be >= 1, got 0"),
        (["seed=-1"], "seed", "must be >= 0, got -1"),
        (["train.lr=abc"], "train.lr", "must be a number, got 'abc'"),
        (["train.lam=-1"], "train.lam", "must be >= 0, got -1"),
        (["num_rounds=2.5"], "num_rounds", "must be an integer, got 2.5"),
        (["eval.k=100000"], "eval.k", "100000 neighbours asked of 1500 base vectors"),
        (["index=rq", "init.source=clients", "privacy=trusted"], "init.source", "faiss's RQ trained on public vectors"),
        (["index=lsq", "strategy=avg_refined", "privacy=trusted"], "strategy", "averaging additive codebooks"),
        (["index=rq", "index.beam_size=0"], "index.beam_size", "must be >= 1, got 0"),
        (["index=lsq", "+index.beam_size=3"], "index.beam_size", "not a key of index=lsq"),
    ],
)
def test_invalid_config_names_the_key(overrides, key, why):
    cfg = compose_config([*SYNTH, "index.m=4", "index.nbits=6", *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}: .*{why}"):
        validate(cfg, D, 1500)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["index.m=5"], "index.m"),
        (["index.nbits=17"], "index.nbits"),
        (["num_clients=0"], "num_clients"),
        (["fraction_train=0"], "fraction_train"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha"),
    ],
)
def test_simulate_refuses_before_writing(tmp_path, overrides, key):
    from simulations.run import simulate

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    cfg = compose_config([*SYNTH, "index.m=4", "index.nbits=6", *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        simulate(cfg, out_dir)
    assert list(out_dir.iterdir()) == []  # no summary.json, nothing half-written


def test_a_run_refuses_a_directory_that_holds_another_run(tmp_path):
    import subprocess
    import sys

    from fed_app.summary import DirtyRunDir
    from simulations.run import simulate

    old = tmp_path / "run"
    old.mkdir()
    (old / "summary.json").write_text('{"final": "the earlier run"}')
    (old / "shards").mkdir()
    with pytest.raises(DirtyRunDir, match=r"already holds a run \(summary\.json, shards\).*choose a fresh directory"):
        simulate(compose_config([*SYNTH, "index.m=4", "index.nbits=6"]), old)
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "simulations.run", *SYNTH, "index.m=4", "index.nbits=6", f"hydra.run.dir={old}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and "RUN REFUSED" in r.stderr + r.stdout and "already holds a run" in r.stderr, r.stderr[-2000:]
    assert (old / "summary.json").read_text() == '{"final": "the earlier run"}'  # untouched
    assert not (old / "failed.json").exists()


def test_summary_json_stays_strict_json_when_a_figure_is_nan(tmp_path):
    import json

    from fed_app.summary import write_summary

    path = write_summary(tmp_path, {"rounds": [{"round": 0, "distortion": float("nan")}], "final": {"x": float("inf"), "y": 1.5}})
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert loaded["final"] == {"x": None, "y": 1.5} and loaded["rounds"][0]["distortion"] is None
