"""Shared fixtures: small composed configs so integration tests stay fast."""

from __future__ import annotations

import pytest

from fed_app.config import compose_config

TINY = ["data=synthetic", "data.num_base=1500", "data.num_queries=100", "index.m=4", "index.nbits=6", "init.local_k=64"]


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str) -> dict:
        return compose_config([*TINY, *overrides])

    return make
