"""Shared fixtures: small composed configs so integration tests stay fast."""

from __future__ import annotations

import faiss
import pytest

from fed_app.config import compose_config

# privacy=secagg: these tests check exact federated numerics (Lloyd, recall vs centralized)
# through secure aggregation; DP has its own tests (tests/privacy/test_dp.py, tests/secagg)
TINY = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6", "init.local_k=64", "privacy=secagg"]


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str) -> dict:
        return compose_config([*TINY, *overrides])

    return make


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Deterministic HNSW construction, and polite on a shared machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


CLEAN = [*TINY, "privacy=trusted", "num_rounds=8", "save_shards=false", "eval.centralized=false"]


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory) -> dict:
    """summary.json of an undisturbed CLEAN run (plain protocol, 8 rounds), shared by the
    fault tests: the hostile-client and the resume tests compare against it."""
    import json

    from simulations.run import simulate

    return json.loads(simulate(compose_config(CLEAN), tmp_path_factory.mktemp("clean") / "run").read_text())
