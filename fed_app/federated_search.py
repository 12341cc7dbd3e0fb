"""Server side of search: send queries to every shard, merge their answers.

Two uses: evaluation during training (each shard answers from an index built with the
current global state, plus exact top-k on its raw vectors as ground truth), and search
of a deployed federation (each shard answers from its persisted, re-encoded store).
Only ids and distances come back; hits are qualified by the node that holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from vector_index.topk import merge_topk

from .experiment import SearchRequest, parse
from .reply_checks import InvalidReply, search_reply
from .state import record_of


@dataclass
class MergedResults:
    compressed: tuple[np.ndarray, np.ndarray]  # (distances, ids)
    exact: tuple[np.ndarray, np.ndarray]
    answered: list[int]
    missing: list[int]
    refused: dict[int, str] = field(default_factory=dict)


@dataclass
class SearchResults:
    """Global answer of a deployed federation: per query, hits sorted by distance.

    kNN: ``distances``/``ids``/``nodes`` are [nq, k] (id -1, node 0 where fewer hits).
    Range: ``lims`` [nq+1] delimits query i's hits in the flat arrays, as faiss does.
    """

    distances: np.ndarray
    ids: np.ndarray
    nodes: np.ndarray
    answered: list[int]
    missing: list[int]
    lims: np.ndarray | None = None
    model_versions: dict[int, int] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)


class QueryRefused(RuntimeError):
    """Every shard that replied refused the request (each reply names its limit)."""

    def __init__(self, message: str, refused: dict[int, str], missing: list[int]) -> None:
        super().__init__(message)
        self.refused, self.missing = refused, missing


def refusal_of(reply: Message) -> str | None:
    """A node's refusal (a limit it enforces), or None for an answer."""
    if "refusal" not in reply.content.config_records:
        return None
    r = reply.content["refusal"]
    return f"{r['limit']}: {r['reason']}"


def _send(grid: Grid, content: RecordDict, timeout: float, check: Callable[[RecordDict], None]) -> tuple[list[Message], list[int], list[int], dict[int, str]]:
    """One query message per connected node; returns (answers, answered, missing,
    refused). An answer that fails ``check`` is dropped and its node named (as missing)."""
    nodes = sorted(grid.get_node_ids())
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    ok, refused, failed = [], {}, set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "query: node %d failed: %s", node, reply.error.reason)
            failed.add(node)
        elif (why := refusal_of(reply)) is not None:
            log(WARNING, "query: node %d refused: %s", node, why)
            refused[node] = why
        else:
            try:
                check(reply.content)
            except InvalidReply as e:
                log(WARNING, "query: reply of node %d rejected: %s", node, e)
                failed.add(node)
                continue
            ok.append(reply)
    ok.sort(key=lambda r: r.metadata.src_node_id)  # equal distances merge in node order
    answered = [r.metadata.src_node_id for r in ok]
    missing = sorted(set(nodes) - set(answered) - set(refused))
    if missing:
        log(WARNING, "query: no answer from node(s) %s; results cover the %d shard(s) that answered", missing, len(answered))
    if not ok and refused:
        reasons = "; ".join(f"node {n}: {why}" for n, why in sorted(refused.items()))
        raise QueryRefused(f"query refused by every shard that replied ({reasons})", refused, missing)
    if not ok:
        raise RuntimeError(f"query: no shard answered (nodes {nodes})")
    return ok, answered, missing, refused


def federated_search(grid: Grid, arrays: ArrayRecord, queries: np.ndarray, k: int, config: ConfigRecord, timeout: float) -> MergedResults:
    """Evaluation: global top-k merged from the per-shard top-k, compressed and exact."""
    content = RecordDict({"arrays": arrays, "queries": record_of({"vectors": queries}), "config": config})
    ok, answered, missing, refused = _send(grid, content, timeout, lambda c: search_reply(c, queries.shape[0], k, ("compressed.", "exact.")))
    parts: dict[str, list[np.ndarray]] = {}
    for rank, reply in enumerate(ok):
        for key, arr in reply.content["results"].items():
            a = arr.numpy()
            parts.setdefault(key, []).append(qualify(a, rank) if key.endswith(".ids") else a)
    return MergedResults(
        compressed=merge_topk(parts["compressed.distances"], parts["compressed.ids"], k),
        exact=merge_topk(parts["exact.distances"], parts["exact.ids"], k),
        answered=answered,
        missing=missing,
        refused=refused,
    )


NODE_BITS = 16  # shard ids must stay below 2**(63 - NODE_BITS) for evaluation keys


def qualify(ids: np.ndarray, rank: int) -> np.ndarray:
    """Evaluation key (id, shard): ids of different organisations may collide.

    The id stays the major part, so equal distances still rank by id as in one index.
    """
    if ids.size and ids.max() >= 1 << (63 - NODE_BITS):
        raise ValueError(f"shard ids must be < 2**{63 - NODE_BITS} for federated evaluation, got {ids.max()}")
    return np.where(ids < 0, -1, (ids << NODE_BITS) | rank)


def merge_qualified(nodes: list[int], distances: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global top-k over shards whose ids are only unique within a shard.

    Each hit is tagged by its slot (shard, column) so merge_topk's ordering carries the
    node along with the id.
    """
    slots = []
    for s, i in enumerate(ids):
        slot = s * i.shape[1] + np.arange(i.shape[1], dtype=np.int64)
        slots.append(np.where(i < 0, -1, np.broadcast_to(slot, i.shape)))
    d, slot = merge_topk(distances, slots, k)
    flat_ids = np.concatenate(ids, axis=1)
    flat_nodes = np.concatenate([np.full(i.shape, n, dtype=np.uint64) for n, i in zip(nodes, ids)], axis=1)
    pad = slot < 0
    safe = np.where(pad, 0, slot)
    out_ids = np.where(pad, -1, np.take_along_axis(flat_ids, safe, axis=1))
    out_nodes = np.where(pad, np.uint64(0), np.take_along_axis(flat_nodes, safe, axis=1))
    return d, out_ids, out_nodes


def merge_ranges(nodes: list[int], parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All hits within the radius from every shard, per query sorted by distance."""
    nq = parts[0][0].size - 1
    lims, dists, ids, owners = [0], [], [], []
    for q in range(nq):
        d = np.concatenate([p[1][p[0][q] : p[0][q + 1]] for p in parts])
        i = np.concatenate([p[2][p[0][q] : p[0][q + 1]] for p in parts])
        o = np.concatenate([np.full(p[0][q + 1] - p[0][q], n, dtype=np.uint64) for n, p in zip(nodes, parts)])
        order = np.argsort(d, kind="stable")
        dists.append(d[order]), ids.append(i[order]), owners.append(o[order])
        lims.append(lims[-1] + d.size)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return np.asarray(lims, dtype=np.int64), cat(dists, np.float32), cat(ids, np.int64), cat(owners, np.uint64)


def search_federation(
    grid: Grid, queries: np.ndarray, config: ConfigRecord, timeout: float, k: int | None = None, radius: float | None = None, rerank: int = 0
) -> SearchResults:
    """Search every shard's persisted store: kNN (``k``, each shard re-ranking its best
    ``rerank`` compressed candidates exactly, locally) or range (``radius``)."""
    asked = {key: v for key, v in (("k", k), ("radius", radius)) if v is not None}
    # the schema every node parses the request with: exactly one of k or radius, each in range
    req = parse(SearchRequest, {"mode": "search", **asked, "rerank": rerank}, what="search request")
    config = ConfigRecord({**dict(config.items()), **req.model_dump(exclude_none=True, exclude={"deploy"})})
    content = RecordDict({"queries": record_of({"vectors": queries}), "config": config})

    def check(c: RecordDict) -> None:
        search_reply(c, queries.shape[0], k, ("",))
        if "metrics" not in c.metric_records or not isinstance(c["metrics"].get("model-version"), (int, float)):
            raise InvalidReply("no model-version in the answer's metrics")

    ok, answered, missing, refused = _send(grid, content, timeout, check)
    nodes = [r.metadata.src_node_id for r in ok]
    res = [{key: a.numpy() for key, a in r.content["results"].items()} for r in ok]
    versions = {n: int(r.content["metrics"]["model-version"]) for n, r in zip(nodes, ok)}
    if len(set(versions.values())) > 1:
        log(WARNING, "search: shards are encoded with different model versions %s; their distances are not comparable", versions)
    if k is not None:
        d, i, o = merge_qualified(nodes, [r["distances"] for r in res], [r["ids"] for r in res], k)
        return SearchResults(d, i, o, answered, missing, model_versions=versions, refused=refused)
    lims, d, i, o = merge_ranges(nodes, [(r["lims"], r["distances"], r["ids"]) for r in res])
    return SearchResults(d, i, o, answered, missing, lims=lims, model_versions=versions, refused=refused)
