"""Flower strategies that federate a PQ codebook beside the encoder.

``CodebookMixin`` goes in front of any Flower Message-API strategy derived from FedAvg:
the base class sees only the encoder (so FedAvg, FedProx and FedAdam aggregate it as
they always do) while the mixin turns the clients' codebook updates into new codebooks:

- ``lloyd``: exact federated Lloyd on sufficient statistics (sums, counts);
- ``average_refined`` (baseline): FedAvg of centroids refined locally from the global;
- ``average_independent`` (baseline): FedAvg of codebooks each client trained alone;
- ``none``: the one-shot initialisation alone; ``local``: no global codebook at all
  (each shard trains its own: the no-federation reference).

Clients learn the mode from the ``strategy.*`` keys every message's config carries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi
from flwr.supercore import log

from . import lloyd
from .state import CODEBOOK, ENCODER, arrays_of, record_nbytes, record_of

MODES = ("lloyd", "average_refined", "average_independent", "none", "local")
EMPTY_POLICIES = ("auto", "split", "keep")


def _content_digest(msg: Message) -> str:
    """A reply's identity by content: sorting by it makes aggregation reproducible."""
    if msg.has_error():
        return ""
    h = hashlib.sha1()
    for name, record in sorted(msg.content.array_records.items()):
        for key, arr in sorted(record.items()):
            h.update(name.encode() + key.encode() + arr.numpy().tobytes())
    return h.hexdigest()


class CodebookMixin:
    """Codebook federation for a FedAvg-family strategy (put it first in the bases)."""

    def __init__(
        self, *args, codebook_update: str = "lloyd", local_iters: int = 1, empty: str = "auto", seed: int = 0, min_replies: int = 1, **kwargs
    ) -> None:
        if codebook_update not in MODES:
            raise ValueError(f"codebook_update={codebook_update!r} must be one of {MODES}")
        if empty not in EMPTY_POLICIES:
            raise ValueError(f"strategy.flower.empty={empty!r} must be one of {EMPTY_POLICIES}")
        super().__init__(*args, **kwargs)
        self.min_replies = min_replies
        self._sent: dict[int, list[int]] = {}
        self.missing: dict[int, list[int]] = {}
        self.codebook_update = codebook_update
        del local_iters  # clients read it from strategy.flower in their config; accepted so the yaml instantiates
        self.empty = empty
        self.seed = seed
        self._codebooks: dict[str, np.ndarray] = {}
        self.round_log: dict[int, dict[str, float]] = {}
        self.latest_evaluate: MetricRecord | None = None
        self.withheld: dict[int, dict[int, str]] = {}  # round -> node -> why it sent nothing
        self.all_simulated = False  # every evaluated shard is a simulation partition
        self.node_policies: dict[int, dict] = {}  # the limits each node says it enforces

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Let the base strategy see the encoder only; ship codebooks beside it."""
        everything = arrays_of(arrays)
        self._codebooks = {k: v for k, v in everything.items() if k.startswith(CODEBOOK)}
        encoder = record_of({k: v for k, v in everything.items() if k.startswith(ENCODER)})
        messages = list(super().configure_train(server_round, encoder, config, grid))
        books = record_of(self._codebooks)
        for msg in messages:
            msg.content["codebooks"] = books
        self._sent[server_round] = sorted(msg.metadata.dst_node_id for msg in messages)
        return messages

    def _drop_withheld(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Replies of shards that released nothing (too small for their min-count) are
        answers, not failures, but they carry nothing to aggregate."""
        kept = []
        for msg in replies:
            if not msg.has_error() and "withheld" in msg.content.config_records:
                node = msg.metadata.src_node_id
                self.withheld.setdefault(server_round, {})[node] = str(msg.content["withheld"]["reason"])
                log(INFO, "round %d: node %d withheld its statistics: %s", server_round, node, msg.content["withheld"]["reason"])
            else:
                kept.append(msg)
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = sorted(replies, key=_content_digest)  # arrival order must not change sums
        updates, weights, nbytes, answered = [], [], [], set()
        for msg in replies:
            if msg.has_error():
                log(WARNING, "round %d: node %d failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            answered.add(msg.metadata.src_node_id)
        replies = self._drop_withheld(server_round, replies)
        for msg in replies:
            if msg.has_error():
                continue
            nbytes.append(sum(record_nbytes(r) for r in msg.content.array_records.values()))
            updates.append(arrays_of(msg.content.array_records.pop("codebook-update")))
            weights.append(float(next(iter(msg.content.metric_records.values()))["num-examples"]))
        sent = self._sent.get(server_round, [])
        self.missing[server_round] = [n for n in sent if n not in answered]
        if self.missing[server_round]:
            log(
                WARNING, "round %d: no usable reply from node(s) %s (died, failed or timed out); aggregating %d of %d",
                server_round, self.missing[server_round], len(answered), len(sent),
            )
        if len(answered) < self.min_replies or not updates:
            log(WARNING, "round %d: %d replies < min_clients=%d, global model unchanged", server_round, len(answered), self.min_replies)
            self.round_log[server_round] = {"clients": float(len(answered)), "clients_missing": float(len(self.missing[server_round]))}
            return None, None
        encoder, metrics = super().aggregate_train(server_round, [m for m in replies if not m.has_error()])
        if encoder is None:
            log(WARNING, "round %d: no usable replies, global model unchanged", server_round)
            return None, metrics
        books, n_empty = self._merge_codebooks(updates, weights, server_round)
        self.round_log[server_round] = {
            "clients": float(len(updates)),
            "clients_missing": float(len(self.missing[server_round])),
            "bytes_up_per_client": float(np.mean(nbytes)),
            "empty_centroids": float(n_empty),
        }
        if n_empty:
            how = "re-seeded by splitting large clusters" if self._empty_policy() == "split" else "kept where they were (cells below the nodes' min-count)"
            log(INFO, "round %d: %d centroids with no released vector %s", server_round, n_empty, how)
        out = arrays_of(encoder)
        out.update(books)
        return record_of(out), metrics

    def _merge_codebooks(self, updates: list[dict[str, np.ndarray]], weights: list[float], server_round: int) -> tuple[dict[str, np.ndarray], int]:
        out, n_empty = {}, 0
        for key, previous in self._codebooks.items():
            level = key[len(CODEBOOK):]
            if self.codebook_update in ("none", "local"):
                out[key] = previous
            elif self.codebook_update == "lloyd":
                sums = np.sum([u[f"{level}.sums"].astype(np.float64) for u in updates], axis=0)
                counts = np.sum([u[f"{level}.counts"].astype(np.int64) for u in updates], axis=0)
                out[key], empty = lloyd.lloyd_update(sums, counts, previous, self._empty_policy(), self.seed + server_round)
                n_empty += empty
            else:
                out[key] = lloyd.weighted_average([u[f"{level}.centroids"] for u in updates], weights)
        return out, n_empty

    def _empty_policy(self) -> str:
        """``auto``: faiss's split only when no node withholds small cells. Under
        min-count a centroid with no released count may still hold many vectors, each
        shard having fewer than its min-count there; splitting it would throw away a
        good centroid (measured: 200 shards of 100 GloVe vectors lost a third of their
        recall in one round), so it keeps its place instead."""
        if self.empty != "auto":
            return self.empty
        nobody_withholds = self.node_policies and all(int(p.get("min-count", 2)) <= 1 for p in self.node_policies.values())
        return "split" if nobody_withholds else "keep"

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Distortion and energy weighted by num-examples (FedAvg); each shard's recall
        estimate weighted by its number of held-out queries; the limits nodes report."""
        replies = self._drop_withheld(server_round, sorted(replies, key=_content_digest))
        ok = [m for m in replies if not m.has_error()]
        self.latest_evaluate = super().aggregate_evaluate(server_round, replies) if ok else None
        if self.latest_evaluate is None:
            return None
        metrics = [next(iter(m.content.metric_records.values())) for m in ok]
        nq = np.array([float(r.get("estimate.queries", 0.0)) for r in metrics])
        for key in [k for k in metrics[0] if k.startswith("estimate.") and k != "estimate.queries"]:
            if nq.sum() > 0:
                self.latest_evaluate[key] = float(np.array([float(r[key]) for r in metrics]) @ nq / nq.sum())
            else:  # no shard could hold out queries: no estimate (rather than a made-up 0)
                del self.latest_evaluate[key]
        self.latest_evaluate["estimate.queries"] = float(nq.sum())
        self.all_simulated = all(float(r.get("simulated-partition", 0.0)) == 1.0 for r in metrics)
        self.node_policies = {m.metadata.src_node_id: dict(m.content["policy"].items()) for m in ok if "policy" in m.content.config_records}
        return self.latest_evaluate


class FederatedPQ(CodebookMixin, FedAvg):
    """Encoder by FedAvg (weighted by num-examples), codebook by federated Lloyd."""


class FederatedPQProx(CodebookMixin, FedProx):
    """Encoder by FedProx: clients add (mu/2)||w - w_global||^2 to their loss."""


class FederatedPQAdam(CodebookMixin, FedAdam):
    """Encoder by FedAdam (server-side Adam on the averaged update)."""


class FederatedPQYogi(CodebookMixin, FedYogi):
    """Encoder by FedYogi."""
