"""The default log keeps one [fedvec] line per round: Flower's record dumps are filtered
(unless verbose=true), its warnings and errors never are."""

from __future__ import annotations

import logging
from logging import ERROR, INFO, WARNING

from flwr.supercore import log

from fed_app.quiet_log import quiet_flower

FLOWER_DUMPS = [
    "Starting FederatedPQ strategy:", "\t├── Number of rounds: 10", "\t├── ConfigRecord (train): {'num_clients': 10, 'seed': 0}",
    "", "[ROUND 3/10]", "configure_train: Sampled 10 nodes (out of 10)", "\t└──> Aggregated MetricRecord: {'clients': 10.0}",
    "Global evaluation", "\t└──> MetricRecord: {'recall_10_at_10': 0.5}", "Strategy execution finished in 12.00s", "Final results:",
    "Initial global evaluation results: {'elapsed_s': 0.0}",
]
OURS = ["[fedvec] round 3/10  distortion 0.1  10-R@10 0.5 (private estimate -)  (3.0s)", "round 3 train: secure sum of 10 client(s) (threshold 7 of 10)"]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logged(verbose: bool) -> list[str]:
    handler = Collect()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        with quiet_flower(verbose):
            for line in FLOWER_DUMPS + OURS:
                log(INFO, "%s", line)
            log(WARNING, "DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed")
            log(WARNING, "node 3 refused: max-k")
            log(ERROR, "\tan indented error stays")
    finally:
        logger.removeHandler(handler)
    return handler.lines


def test_default_log_has_only_fedvec_lines_and_every_warning():
    assert _logged(verbose=False) == [*OURS, "node 3 refused: max-k", "\tan indented error stays"]


def test_verbose_keeps_flower_records_and_the_filter_is_removed_after_the_run():
    assert len(_logged(verbose=True)) == len(FLOWER_DUMPS) + len(OURS) + 3
    assert not logging.getLogger("flwr").filters
