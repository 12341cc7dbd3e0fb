"""Early stopping on the federation's own distortion estimate (seed §3.1.5).

Training stops once the relative improvement of the distortion stays below ``stop.tol``
for ``stop.patience`` evaluated rounds in a row (or at ``num_rounds``), and the final
model is the best one seen, the initial one included. The signal is what the federation
itself knows, each round's private estimate (the clients' aggregated distortion), never
the simulator's truth, so a simulation stops where a deployment would. Under DP the
federation measures distortion only at the end (every measurement is a noisy release),
so no round gives a signal and the run goes to ``num_rounds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class StopTraining(Exception):
    """Raised by the round evaluator to end Flower's round loop early."""


@dataclass
class EarlyStop:
    tol: float
    patience: int
    best: float = math.inf
    best_round: int | None = None
    best_model: Any = None  # the ArrayRecord of the best round
    last: float | None = None
    stale: int = 0  # evaluated rounds in a row that improved by less than tol
    stopped_round: int | None = None

    def update(self, server_round: int, distortion: float | None, model: Any) -> bool:
        """Note one round's distortion estimate (None: not measured this round);
        True when training should stop after this round."""
        if distortion is None or not math.isfinite(distortion):
            return False
        if distortion < self.best:
            self.best, self.best_round, self.best_model = distortion, server_round, model
        if self.last is not None:
            gain = (self.last - distortion) / max(abs(self.last), 1e-30)
            self.stale = self.stale + 1 if gain < self.tol else 0
        self.last = distortion
        if self.stale >= self.patience:
            self.stopped_round = server_round
            return True
        return False

    def report(self, num_rounds: int) -> dict[str, Any]:
        """summary.json ``stopped``: why and when training ended, and which model is final."""
        if self.stopped_round is not None:
            reason = (f"stop.tol: the distortion estimate improved by less than {self.tol:g} (relative) "
                      f"for stop.patience={self.patience} rounds in a row")
        else:
            reason = "num_rounds"
        return {"reason": reason, "round": self.stopped_round if self.stopped_round is not None else num_rounds,
                "best_round": self.best_round, "best_distortion_estimate": None if self.best_round is None else self.best,
                "final_model": "the best round's" if self.best_round is not None else "the last round's (no distortion estimate)"}
