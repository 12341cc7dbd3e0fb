"""A node keeps its shard open between messages and reopens it when a newer version lands."""

from __future__ import annotations

import numpy as np
import pytest

from fed_app import shard_store
from vector_index.quantizers import IndexSpec
from vector_index.store import Shard
from vector_index.validation import VectorError


def test_warm_shard_is_reused_until_a_new_version_is_committed(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    path = tmp_path / "s"
    shard = Shard.create(path, 8, IndexSpec("flat"), commit=False)
    shard.add(x[:200])
    shard.save()
    first = shard_store.open_shard(path)
    assert shard_store.open_shard(path) is first and len(first) == 200
    other = Shard.open(path)  # another process's import, deploy or rollback
    other.add(x[200:])
    other.save()
    second = shard_store.open_shard(path)
    assert second is not first and len(second) == 300 and second.version == other.version
    with pytest.raises(VectorError, match="holds no shard"):
        shard_store.open_shard(tmp_path / "none")
