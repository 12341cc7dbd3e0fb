"""One progress line per round in the default log.

Flower's ``Strategy.start`` logs, around fedvec's own ``[fedvec] round`` line, a summary
of every record it sends and receives (the whole ConfigRecord, each MetricRecord, the
final tables). Useful when debugging Flower itself; noise for everyone else. With
``verbose=false`` (the default) a filter on Flower's logger drops exactly those INFO
lines, and the deprecation notice of ``run_simulation`` (fedvec's simulator uses it on
purpose); warnings and errors always pass.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO

FLOWER_RECORD_LINES = re.compile(
    r"^(\s*$|\t|Starting \w+ strategy:|Initial global evaluation results|\[ROUND \d+/\d+\]|Global evaluation$"
    r"|configure_(train|evaluate): Sampled|aggregate_(train|evaluate): Received|Strategy execution finished|Final results:)"
)
DEPRECATED_SIMULATION = re.compile(r"^\s*DEPRECATED FEATURE: The `run_simulation` function is deprecated")


class FlowerRecordDumps(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.levelno == INFO and FLOWER_RECORD_LINES.match(msg):
            return False
        return not DEPRECATED_SIMULATION.match(msg)


@contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Filter Flower's record dumps out of its logger for the duration (unless verbose)."""
    logger = logging.getLogger("flwr")
    quiet = None if verbose else FlowerRecordDumps()
    if quiet is not None:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        if quiet is not None:
            logger.removeFilter(quiet)
