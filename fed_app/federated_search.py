"""Server side of evaluation: send queries to every shard, merge their top-k lists."""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from vector_index.topk import merge_topk

from .state import record_of


@dataclass
class MergedResults:
    compressed: tuple[np.ndarray, np.ndarray]  # (distances, ids)
    exact: tuple[np.ndarray, np.ndarray]
    answered: list[int]
    missing: list[int]


def federated_search(grid: Grid, arrays: ArrayRecord, queries: np.ndarray, k: int, config: ConfigRecord, timeout: float) -> MergedResults:
    """One ``query`` message per node; global top-k merged from the per-shard top-k."""
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({"arrays": arrays, "queries": record_of({"vectors": queries}), "config": config})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    parts: dict[str, list[np.ndarray]] = {}
    answered = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(WARNING, "query: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        answered.append(reply.metadata.src_node_id)
        for key, arr in reply.content["results"].items():
            parts.setdefault(key, []).append(arr.numpy())
    missing = sorted(set(nodes) - set(answered))
    if not answered:
        raise RuntimeError(f"query: no shard answered (nodes {nodes})")
    return MergedResults(
        compressed=merge_topk(parts["compressed.distances"], parts["compressed.ids"], k),
        exact=merge_topk(parts["exact.distances"], parts["exact.ids"], k),
        answered=sorted(answered),
        missing=missing,
    )
