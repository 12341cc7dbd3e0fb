"""EarlyStop: the rule itself, on plain numbers (the simulation test is in test_simulation)."""

from __future__ import annotations

import math

from fed_app.early_stop import EarlyStop


def run(values: list[float | None], tol: float = 0.01, patience: int = 2) -> tuple[EarlyStop, int | None]:
    stop = EarlyStop(tol, patience)
    for rnd, v in enumerate(values):
        if stop.update(rnd, v, f"model-{rnd}"):
            return stop, rnd
    return stop, None


def test_stops_after_patience_rounds_below_tol_and_keeps_the_best():
    stop, at = run([10.0, 5.0, 4.99, 4.999, 3.0])
    assert at == 3 and stop.stopped_round == 3
    assert stop.best_round == 2 and stop.best_model == "model-2" and stop.best == 4.99
    assert stop.report(10)["reason"].startswith("stop.tol") and stop.report(10)["round"] == 3


def test_an_improvement_resets_the_count_and_a_worse_round_counts_as_stale():
    stop, at = run([10.0, 9.995, 5.0, 5.0, 6.0])  # stale, improved, stale, stale
    assert at == 4 and stop.best_round == 2


def test_the_initial_model_can_be_the_best():
    stop, at = run([1.0, 2.0, 3.0])
    assert at == 2 and stop.best_round == 0 and stop.best_model == "model-0"


def test_rounds_without_an_estimate_do_not_count():
    stop, at = run([10.0, None, None, math.nan, 9.0, None, 8.999, 8.998])
    assert at == 7 and stop.best_round == 7
    stop, at = run([None, None, None])
    assert at is None and stop.report(3) == {"reason": "num_rounds", "round": 3, "best_round": None, "best_distortion_estimate": None,
                                             "final_model": "the last round's (no distortion estimate)"}
