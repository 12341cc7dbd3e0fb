"""Empty centroids under min-count: a centroid with no released vector may still hold
many (each shard having fewer than its min-count there), so ``empty=auto`` keeps it
unless every node releases every cell; faiss's split stays the rule without min-count."""

from __future__ import annotations

import numpy as np
import pytest

from fed_app.config import ConfigError, compose_config, load_experiment
from fed_app.lloyd import lloyd_update
from fed_app.strategy import FederatedPQ


def strategy(empty: str, min_counts: list[int]) -> FederatedPQ:
    s = FederatedPQ(empty=empty)
    s.node_policies = {n: {"min-count": c} for n, c in enumerate(min_counts)}
    return s


def test_auto_keeps_when_any_node_withholds_and_splits_otherwise():
    assert strategy("auto", [5, 5])._empty_policy() == "keep"
    assert strategy("auto", [1, 5])._empty_policy() == "keep"
    assert strategy("auto", [1, 1])._empty_policy() == "split"
    assert strategy("auto", [])._empty_policy() == "keep"  # before any node said: assume withholding
    assert strategy("split", [5])._empty_policy() == "split" and strategy("keep", [1])._empty_policy() == "keep"


def test_unknown_policy_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^strategy\.flower\.empty: must be one of 'auto', 'split' or 'keep', got 'drop'"):
        load_experiment(compose_config(["strategy.flower.empty=drop"]))


def test_keep_leaves_a_withheld_centroid_where_split_would_move_it():
    prev = np.array([[[0.0], [1.0], [10.0]]], dtype=np.float32)  # [M=1, K=3, dsub=1]
    sums = np.array([[[0.0], [2.2], [40.0]]])
    counts = np.array([[0, 2, 4]])  # centroid 0: every shard withheld its cell
    kept, n = lloyd_update(sums, counts, prev, "keep", seed=0)
    split, _ = lloyd_update(sums, counts, prev, "split", seed=0)
    assert n == 1 and kept[0, 0, 0] == 0.0 and split[0, 0, 0] != 0.0
