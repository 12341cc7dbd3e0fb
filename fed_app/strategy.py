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
import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum
from flwr.supercore import log

from vector_index.additive import round_plan
from vector_index.model_checks import ModelBounds
from vector_index.quantizers import IndexSpec
from vector_index.validation import ADDITIVE_KINDS, VectorError

from . import lloyd
from .encoder import affine_of
from .model_guard import check_model
from .reply_checks import Expected, InvalidReply, evaluate_reply, train_reply
from .secagg.rounds import SETUP, new_session, secure_sum, setup_record
from .secure_statistics import LOSS_KEYS, evaluate_metrics, relaxed_procrustes, rotation_weights
from .state import CODEBOOK, ENCODER, GlobalState, arrays_of, encoder_record, record_nbytes, record_of


@dataclass(frozen=True)
class SecureSettings:
    """The server's side of secure aggregation (clients check it against their own)."""

    threshold: float  # share of a session's roster needed to unmask
    min_clients: int  # fewest clients a session may sum
    dp: bool  # clients add noise: sums are noisy, evaluation runs once at the end
    empty_sigmas: float  # a noisy count below this many noise stds leaves its centroid in place
    num_rounds: int
    timeout: float
    procrustes_step: float = 1.0  # under DP: R <- polar(R + step (P - R)), P the Procrustes rotation

@dataclass(frozen=True)
class ModelChecks:
    """What the server checks every reply and every aggregated model against."""

    spec: IndexSpec
    dim: int
    data_norm: float  # bound on a raw vector's norm: the public (or init) vectors'
    bounds: ModelBounds
    examples_digits: int
    min_count: int


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
        self._evaluate_every, self._num_rounds = 1, 0  # see evaluate_every()
        self.withheld: dict[int, dict[int, str]] = {}  # round -> node -> why it sent nothing
        self.all_simulated = False  # every evaluated shard is a simulation partition
        self.node_policies: dict[int, dict] = {}  # the limits each node says it enforces
        self.secure: SecureSettings | None = None
        self.releases: list[dict] = []  # every noisy secure sum: round, phase, noise multipliers
        self._grid: Grid | None = None
        self._sessions: dict[tuple[int, str], str] = {}
        self._encoder: dict[str, np.ndarray] = {}
        self._noise_std: dict[str, float] = {}  # total noise std per summed array, last noisy sum
        self.checks: ModelChecks | None = None
        self._sent_model: dict[str, np.ndarray] = {}  # the global model of this round's train / evaluate messages
        self._evaluated_model: dict[str, np.ndarray] = {}
        self.rejected: list[dict] = []  # replies dropped as invalid: round, phase, node, reason
        self.rejected_models: dict[int, str] = {}  # round -> why its aggregate was not applied
        self.round_offset = 0  # a resumed run: Flower's round 1 is this run's round offset + 1

    def checkpoint_logs(self) -> dict:
        """Everything summary.json is built from, as JSON (for fed_app.checkpoint)."""
        return {
            "missing": {str(r): v for r, v in self.missing.items()}, "rejected": self.rejected,
            "rejected_models": {str(r): v for r, v in self.rejected_models.items()},
            "round_log": {str(r): v for r, v in self.round_log.items()},
            "withheld": {str(r): {str(n): w for n, w in d.items()} for r, d in self.withheld.items()},
            "releases": self.releases, "node_policies": {str(n): p for n, p in self.node_policies.items()},
            "all_simulated": self.all_simulated, "noise_std": self._noise_std,
        }

    def restore(self, logs: dict, moments: dict[str, dict[str, np.ndarray]], server_round: int) -> None:
        """Continue after ``server_round`` from a checkpoint."""
        self.round_offset = server_round
        self.missing = {int(r): v for r, v in logs["missing"].items()}
        self.rejected = list(logs["rejected"])
        self.rejected_models = {int(r): v for r, v in logs["rejected_models"].items()}
        self.round_log = {int(r): v for r, v in logs["round_log"].items()}
        self.withheld = {int(r): {int(n): w for n, w in d.items()} for r, d in logs["withheld"].items()}
        self.releases = list(logs["releases"])
        self.node_policies = {int(n): p for n, p in logs["node_policies"].items()}
        self.all_simulated = bool(logs["all_simulated"])
        self._noise_std = dict(logs["noise_std"])
        for name, values in moments.items():  # FedAdam / FedYogi's server moments
            setattr(self, name, values)

    def moments(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: dict(v) for name in ("m_t", "v_t") if isinstance(v := getattr(self, name, None), dict)}

    def use_model_checks(self, checks: ModelChecks) -> None:
        self.checks = checks

    def evaluate_every(self, every: int, num_rounds: int) -> None:
        """Ask the clients for their private estimate on rounds ``0, every, 2 every, ...`` and
        the last only: at 1,000 clients the evaluate messages are half a round's traffic."""
        self._evaluate_every, self._num_rounds = every, num_rounds

    def _expected(self, model: dict[str, np.ndarray], server_round: int = 1) -> Expected:
        """What replies about ``model`` (the arrays sent, prefixed) must look like."""
        assert self.checks is not None
        c = self.checks
        encoder = {k[len(ENCODER):]: v for k, v in model.items() if k.startswith(ENCODER)}
        books = {k[len(CODEBOOK):]: v for k, v in model.items() if k.startswith(CODEBOOK)}
        return Expected(c.spec, c.dim, encoder, books, self.codebook_update, c.data_norm, c.bounds, c.examples_digits, c.min_count, server_round)

    def _reject(self, server_round: int, phase: str, msg: Message, reason: str) -> None:
        node = msg.metadata.src_node_id
        self.rejected.append({"round": server_round, "phase": phase, "node": node, "reason": reason})
        log(WARNING, "round %d: %s reply of node %d rejected: %s", server_round, phase, node, reason)

    def _accept_model(self, server_round: int, record: ArrayRecord) -> ArrayRecord | None:
        """The aggregate as the next global model, or None (model unchanged) if it fails
        the model checks: a bad model is never applied, saved or deployed."""
        if self.checks is None:
            return record
        state = GlobalState.from_record(record)
        try:
            check_model(state, self.checks.spec, self.checks.dim, self.checks.data_norm, self.checks.bounds)
        except VectorError as e:
            self.rejected_models[server_round] = str(e)
            log(ERROR, "round %d: the aggregated model fails its checks (%s); global model unchanged", server_round, e)
            return None
        return record

    def use_secure_aggregation(self, settings: SecureSettings) -> None:
        self.secure = settings

    def _open_sessions(self, messages: list[Message], server_round: int, phase: str, grid: Grid) -> None:
        session = new_session()
        self._sessions[(server_round, phase)] = session
        self._grid = grid
        for msg in messages:
            msg.content[SETUP] = setup_record(session)

    def _note_nodes(self, replies: list[Message]) -> None:
        """Limits and partition kind each node states in its setup reply (not secret)."""
        ok = [m for m in replies if not m.has_error() and "info" in m.content.config_records]
        if ok:
            self.node_policies.update({m.metadata.src_node_id: dict(m.content["policy"].items()) for m in ok})
            self.all_simulated = all(float(m.content["info"]["simulated-partition"]) == 1.0 for m in ok)

    def _note_release(self, server_round: int, phase: str, replies: list[Message], result) -> None:
        """A noisy sum is a DP release: record the smallest multiplier a summed node
        stated (the guarantee), and the total noise std per array (for empty cells)."""
        summed = [m for m in replies if not m.has_error() and m.metadata.src_node_id in result.summed and "info" in m.content.config_records]
        multipliers = [float(m.content["info"]["noise-multiplier"]) for m in summed]
        if not multipliers or min(multipliers) <= 0:
            return
        self.releases.append({"round": server_round, "phase": phase, "noise_multiplier": min(multipliers),
                              "clients": len(result.summed), "threshold": result.threshold})
        variance: dict[str, float] = {}
        for m in summed:
            for k, v in m.content["noise"].items():
                variance[k] = variance.get(k, 0.0) + float(v) ** 2 / result.threshold
        self._noise_std = {k: math.sqrt(v) for k, v in variance.items()}

    def _secure_sum(self, server_round: int, phase: str, replies: list[Message]):
        assert self.secure is not None and self._grid is not None
        self._note_nodes(replies)
        result = secure_sum(self._grid, self._sessions[(server_round, phase)], replies, self.secure.threshold,
                            self.secure.min_clients, self.secure.timeout, f"round {server_round} {phase}")
        if result.arrays is not None:
            self._note_release(server_round, phase, replies, result)
        return result

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Let the base strategy see the encoder only; ship codebooks beside it."""
        server_round += self.round_offset
        everything = arrays_of(arrays)
        self._sent_model = everything
        self._codebooks = {k: v for k, v in everything.items() if k.startswith(CODEBOOK)}
        encoder = record_of({k: v for k, v in everything.items() if k.startswith(ENCODER)})
        self._encoder = {k[len(ENCODER):]: v for k, v in arrays_of(encoder).items()}
        messages = list(super().configure_train(server_round, encoder, config, grid))
        books = record_of(self._codebooks)
        for msg in messages:
            msg.content["codebooks"] = books
        self._sent[server_round] = sorted(msg.metadata.dst_node_id for msg in messages)
        if self.secure is not None:
            self._open_sessions(messages, server_round, "train", grid)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Under DP the private evaluation is one noisy release, after the last round only."""
        server_round += self.round_offset
        if self.secure is not None and self.secure.dp and server_round != self.secure.num_rounds:
            return []
        if server_round % self._evaluate_every and server_round != self._num_rounds:
            self.latest_evaluate = None  # no estimate this round, rather than the last one's
            return []
        self._evaluated_model = arrays_of(arrays)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if self.secure is not None:
            self._open_sessions(messages, server_round, "evaluate", grid)
        return messages

    def _drop_withheld(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Replies of shards that released nothing (too small for their min-count) are
        answers, not failures, but they carry nothing to aggregate."""
        kept = []
        for msg in replies:
            if not msg.has_error() and "refusal" in msg.content.config_records:
                log(WARNING, "round %d: node %d refused: %s", server_round, msg.metadata.src_node_id, msg.content["refusal"]["reason"])
            elif not msg.has_error() and "withheld" in msg.content.config_records:
                node = msg.metadata.src_node_id
                self.withheld.setdefault(server_round, {})[node] = str(msg.content["withheld"]["reason"])
                log(INFO, "round %d: node %d withheld its statistics: %s", server_round, node, msg.content["withheld"]["reason"])
            else:
                kept.append(msg)
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = sorted(replies, key=_content_digest)  # arrival order must not change sums
        updates, weights, nbytes, answered = [], [], [], set()
        for msg in replies:
            if msg.has_error():
                log(WARNING, "round %d: node %d failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            answered.add(msg.metadata.src_node_id)
        replies = self._drop_withheld(server_round, replies)
        if self.secure is not None:
            return self._aggregate_secure_train(server_round, replies, answered)
        valid = []
        expected = self._expected(self._sent_model, server_round) if self.checks is not None else None
        for msg in replies:
            if msg.has_error():
                continue
            if expected is not None:
                try:
                    update, n = train_reply(msg.content, expected)
                except InvalidReply as e:
                    self._reject(server_round, "train", msg, str(e))
                    answered.discard(msg.metadata.src_node_id)
                    continue
            else:
                update, n = arrays_of(msg.content["codebook-update"]), float(next(iter(msg.content.metric_records.values()))["num-examples"])
            nbytes.append(sum(record_nbytes(r) for r in msg.content.array_records.values()))
            msg.content.array_records.pop("codebook-update", None)
            updates.append(update)
            weights.append(n)
            valid.append(msg)
        sent = self._sent.get(server_round, [])
        self.missing[server_round] = [n for n in sent if n not in answered]
        if self.missing[server_round]:
            log(
                WARNING, "round %d: no usable reply from node(s) %s (died, failed or timed out); aggregating %d of %d",
                server_round, self.missing[server_round], len(answered), len(sent),
            )
        if len(answered) < self.min_replies or not valid:
            log(WARNING, "round %d: %d replies < min_clients=%d, global model unchanged", server_round, len(answered), self.min_replies)
            self.round_log[server_round] = {"clients": float(len(answered)), "clients_missing": float(len(self.missing[server_round]))}
            return None, None
        encoder, metrics = super().aggregate_train(server_round, valid)
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
        return self._accept_model(server_round, record_of(out)), metrics

    def _aggregate_secure_train(self, server_round: int, replies: list[Message], answered: set[int]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round from one secure sum: the codebook step on the summed statistics, the
        encoder by the base strategy on the average (or Procrustes under DP)."""
        result = self._secure_sum(server_round, "train", replies)
        sent = self._sent.get(server_round, [])
        self.missing[server_round] = [n for n in sent if n not in result.summed]
        self.round_log[server_round] = {"clients": float(len(result.summed)), "clients_missing": float(len(self.missing[server_round]))}
        if self.missing[server_round]:
            log(WARNING, "round %d: no usable reply from node(s) %s (died, failed, timed out or dropped from the secure sum); "
                "aggregating %d of %d", server_round, self.missing[server_round], len(result.summed), len(sent))
        if result.arrays is None:
            log(WARNING, "round %d: %s; global model unchanged", server_round, result.reason)
            return None, None
        if result.dropped:
            log(WARNING, "round %d: dropped from the secure sum: %s", server_round, "; ".join(f"node {n}: {why}" for n, why in sorted(result.dropped.items())))
        total = result.arrays
        self.round_log[server_round]["bytes_up_per_client"] = float(np.mean([result.bytes_up.get(n, 0) for n in result.summed]))
        books, n_empty = self._merge_summed_codebooks(total, server_round)
        self.round_log[server_round]["empty_centroids"] = float(n_empty)
        out = dict(self._encoder)
        metrics = MetricRecord({"clients": float(total["clients"][0])})
        if "encoder.cross" in total:
            if server_round < self.secure.num_rounds:  # the last codebook step was taken with this rotation: keep it
                current = affine_of(self._encoder)[0]
                out = rotation_weights(self._encoder, relaxed_procrustes(total["encoder.cross"], current, self.secure.procrustes_step))
        elif any(k.startswith(ENCODER) for k in total):
            n = float(total["examples"][0])
            avg = {k[len(ENCODER):]: (v / n).astype(self._encoder[k[len(ENCODER):]].dtype) for k, v in total.items() if k.startswith(ENCODER)}
            averaged = Message(RecordDict({"arrays": encoder_record(avg), "metrics": MetricRecord({"num-examples": n})}), dst_node_id=0, message_type="train")
            encoder, _ = super().aggregate_train(server_round, [averaged])  # FedAvg / FedAdam / FedYogi's server step
            out = {k[len(ENCODER):]: v for k, v in arrays_of(encoder).items()}
            metrics = MetricRecord({"num-examples": n, **{k: float(total[f"loss.{k}"][0]) / n for k in LOSS_KEYS if f"loss.{k}" in total}})
        merged = {ENCODER + k: v for k, v in out.items()}
        merged.update(books)
        return self._accept_model(server_round, record_of(merged)), metrics

    def _merge_summed_codebooks(self, total: dict[str, np.ndarray], server_round: int) -> tuple[dict[str, np.ndarray], int]:
        out, n_empty = {}, 0
        for key, previous in self._codebooks.items():
            level = key[len(CODEBOOK):]
            if f"codebook.{level}.sums" in total:
                counts = total[f"codebook.{level}.counts"]
                floor = self.secure.empty_sigmas * self._noise_std.get(f"codebook.{level}.counts", 0.0)
                counts = np.where(counts > max(floor, 0.5), counts, 0.0)  # a noisy count near 0 is no cell
                out[key], empty = self._lloyd_step(level, total[f"codebook.{level}.sums"], counts, previous, server_round)
                n_empty += empty
            elif f"codebook.{level}.centroids" in total:
                out[key] = (total[f"codebook.{level}.centroids"] / float(total["examples"][0])).astype(np.float32)
            else:
                out[key] = previous
        return out, n_empty

    def _merge_codebooks(self, updates: list[dict[str, np.ndarray]], weights: list[float], server_round: int) -> tuple[dict[str, np.ndarray], int]:
        out, n_empty = {}, 0
        for key, previous in self._codebooks.items():
            level = key[len(CODEBOOK):]
            if self.codebook_update in ("none", "local"):
                out[key] = previous
            elif self.codebook_update == "lloyd":
                sums = np.sum([u[f"{level}.sums"].astype(np.float64) for u in updates], axis=0)
                counts = np.sum([u[f"{level}.counts"].astype(np.int64) for u in updates], axis=0)
                out[key], empty = self._lloyd_step(level, sums, counts, previous, server_round)
                n_empty += empty
            else:
                out[key] = lloyd.weighted_average([u[f"{level}.centroids"] for u in updates], weights)
        return out, n_empty

    def _lloyd_step(self, level: str, sums: np.ndarray, counts: np.ndarray, previous: np.ndarray, server_round: int) -> tuple[np.ndarray, int]:
        """The Lloyd update of ``level``; an additive level's statistics are those of this
        round's codebook only (``round_plan``), which alone moves."""
        if level not in ADDITIVE_KINDS:
            return lloyd.lloyd_update(sums, counts, previous, self._empty_policy(), self.seed + server_round)
        assert self.checks is not None  # the federation always sets them
        stage, _ = round_plan(server_round, previous.shape[0], self.checks.spec.stage_rounds)
        out = previous.astype(np.float32).copy()
        out[stage : stage + 1], empty = lloyd.lloyd_update(sums, counts, previous[stage : stage + 1], self._empty_policy(), self.seed + server_round)
        return out, empty

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
        server_round += self.round_offset
        replies = self._drop_withheld(server_round, sorted(replies, key=_content_digest))
        ok = [m for m in replies if not m.has_error()]
        if self.secure is not None:
            if (server_round, "evaluate") not in self._sessions:  # under DP only the last round evaluates
                return None
            result = self._secure_sum(server_round, "evaluate", ok)
            self.latest_evaluate = MetricRecord(evaluate_metrics(result.arrays)) if result.arrays is not None else None
            return self.latest_evaluate
        if self.checks is not None:
            good, expected = [], self._expected(self._evaluated_model)
            for msg in ok:
                try:
                    evaluate_reply(msg.content, expected)
                    good.append(msg)
                except InvalidReply as e:
                    self._reject(server_round, "evaluate", msg, str(e))
            ok = replies = good
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


class FederatedPQTrimmedAvg(CodebookMixin, FedTrimmedAvg):
    """Encoder by Flower's trimmed mean (drops the beta share of extremes per entry):
    robust to a few clients whose encoder is finite and in bounds but wrong."""


class FederatedPQMedian(CodebookMixin, FedMedian):
    """Encoder by Flower's coordinate-wise median."""


class FederatedPQKrum(CodebookMixin, Krum):
    """Encoder by Flower's Krum: the one update closest to its neighbours."""
