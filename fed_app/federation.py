"""The server's whole run: validate, initialise, train rounds, evaluate, summarise.

Flower's ``Strategy.start`` drives the rounds; this module adds the one-shot codebook
initialisation before them and the federated query evaluation after each of them.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from hydra.utils import instantiate

from vector_index.datasets import Dataset, load_npy_file
from vector_index.quantizers import IndexSpec, train_reference_index
from vector_index.topk import recall_report

from . import checkpoint, lloyd
from .client_tasks import ESTIMATE_KEYS, train_local_codebooks
from .config import load_experiment, validate
from .experiment import Experiment
from .encoder import affine_of, encode_weights, initial_weights
from .federated_search import federated_search
from .early_stop import EarlyStop, StopTraining
from .interrupts import check_stop
from .local_data import load_dataset
from .privacy.report import privacy_summary
from .reference_cache import cached_reference, reference_key
from .settings import client_config
from .simulator_truth import exact_neighbours, true_metrics
from .model_guard import max_norm
from .reply_checks import InvalidReply, init_reply
from .strategy import ModelChecks, SecureSettings
from .state import GlobalState, arrays_of, record_nbytes, record_of
from .summary import check_fresh_run_dir, final_table, write_summary


def wait_for_nodes(grid: Grid, n: int, wait_s: float) -> list[int]:
    """The connected SuperNodes once there are num_clients of them; fails after
    ``nodes_wait_s`` with the count it saw (Flower's own sampling would wait forever)."""
    deadline = time.time() + wait_s
    while len(nodes := list(grid.get_node_ids())) < n:
        check_stop()
        if time.time() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} SuperNode(s) connected after nodes_wait_s={wait_s:g}s but num_clients={n}; "
                "start more SuperNodes, set num_clients to match the federation, or raise nodes_wait_s"
            )
        time.sleep(0.5)
    return nodes


def initialise_codebooks(
    grid: Grid, state: GlobalState, spec: IndexSpec, cfg: Experiment, timeout: float, withheld: dict[int, str], checks: ModelChecks, rejected: list[dict]
) -> int:
    """One-shot init: clients send local centroids supported by >= min-count vectors,
    with rounded counts; the server clusters them, weighted (k-FED style).

    Returns the bytes one client uploaded (mean), for the communication report; fills
    ``withheld`` with the nodes that sent nothing and why.
    """
    nodes = sorted(grid.get_node_ids())
    nbytes = []
    for level in spec.levels:
        config = client_config(cfg)
        config["init-level"] = level
        content = RecordDict({"arrays": state.to_record(), "config": config})
        replies = [r for r in grid.send_and_receive([Message(content=content, message_type="train.init", dst_node_id=n) for n in nodes], timeout=timeout)]
        # replies arrive in any order; sort them by content so the server's k-means
        # sees the same input every run (a seed alone does not make it reproducible)
        coarse = float(np.linalg.norm(state.codebooks["coarse"], axis=-1).max()) if "coarse" in state.codebooks else 0.0
        valid = {}
        for r in replies:
            if r.has_error() or "withheld" in r.content.config_records or "refusal" in r.content.config_records:
                continue
            try:
                valid[r.metadata.message_id] = init_reply(r.content, spec.level_shape(level, _dim(state)), checks.data_norm, coarse, level, checks.bounds)
            except InvalidReply as e:
                rejected.append({"round": 0, "phase": f"init {level}", "node": r.metadata.src_node_id, "reason": str(e)})
                log(WARNING, "init %s: reply of node %d rejected: %s", level, r.metadata.src_node_id, e)
        ok = sorted((r for r in replies if r.metadata.message_id in valid),
                    key=lambda r: hashlib.sha1(valid[r.metadata.message_id][0].tobytes()).hexdigest())
        for r in replies:
            if r.has_error():
                log(INFO, "init: node %d failed: %s", r.metadata.src_node_id, r.error.reason)
            elif "withheld" in r.content.config_records:
                withheld[r.metadata.src_node_id] = str(r.content["withheld"]["reason"])
                log(INFO, "init: node %d sent no centroids: %s", r.metadata.src_node_id, withheld[r.metadata.src_node_id])
        if not ok:
            failed = sum(1 for r in replies if r.has_error())
            raise RuntimeError(
                f"init ({level}): no client sent centroids: {len(replies)} of {len(nodes)} node(s) replied within "
                f"timeout_s={timeout:.0f}, {len(withheld)} withheld (shard below its min-count), {failed} failed; "
                "the log names each node's reason"
            )
        m, k, _ = spec.level_shape(level, _dim(state))
        cents = [valid[r.metadata.message_id][0] for r in ok]
        counts = [valid[r.metadata.message_id][1] for r in ok]
        supported = int(min((c > 0).sum(axis=1).min() for c in counts) if counts else 0)
        total = int(sum((c > 0).sum(axis=1).min() for c in counts))
        if total < k:
            raise RuntimeError(
                f"init ({level}): the clients sent only {total} centroids supported by their min-count per sub-space, "
                f"the codebook needs K={k}; raise init.local_k, use init.source=public, or use fewer bits/lists"
            )
        nbytes += [record_nbytes(r.content["init"]) for r in ok]
        state.codebooks[level] = lloyd.weighted_merge(cents, counts, k, cfg.init.kmeans_iters, cfg.seed)
        log(INFO, "init %s: %d clients sent %d supported local centroids per sub-space (fewest from one client: %d) -> K=%d",
            level, len(ok), total, supported, k)
    return int(np.mean(nbytes)) if nbytes else 0


def load_public_vectors(cfg: Experiment, data: Dataset) -> np.ndarray:
    """The server's own vectors: ``init.public_path``, else the public (held-out) queries."""
    path = cfg.init.public_path
    return load_npy_file(path, name="init.public_path") if path else data.queries


def public_init(state: GlobalState, spec: IndexSpec, cfg: Experiment, data: Dataset) -> int:
    """Init from public vectors (``init.public_path``, else the public queries): faiss
    k-means on the server, nothing asked of any client. Returns the vectors used."""
    path = cfg.init.public_path
    public = load_public_vectors(cfg, data)
    if public.shape[1] != _dim(state):
        raise ValueError(f"init.public_path: {public.shape[1]}-d vectors but the federation trains on {_dim(state)}-d vectors")
    most = max(spec.level_shape(level, _dim(state))[1] for level in spec.levels)
    if public.shape[0] < most:
        raise ValueError(f"init.source=public: {public.shape[0]} public vectors cannot seed {most} centroids")
    z = encode_weights(state.encoder, public)
    state.codebooks.update(train_local_codebooks(z, spec, cfg.init.kmeans_iters, cfg.seed))
    log(INFO, "init: codebooks from %d public vectors (%s); no client statistics used", public.shape[0], path or "the held-out queries")
    return int(public.shape[0])


def deploy_model(grid: Grid, arrays: ArrayRecord, cfg: Experiment, out_dir: Path, model_version: int, timeout: float) -> dict[str, Any]:
    """After the last round: every client re-encodes its shard with the final global model
    and saves it (deployment: its ``shard-dir``; simulation: ``<out_dir>/shards``)."""
    nodes = sorted(grid.get_node_ids())
    config = client_config(cfg)
    config["deploy.model-version"] = model_version
    config["deploy.shard-root"] = str(out_dir / "shards")
    content = RecordDict({"arrays": arrays, "config": config})
    replies = grid.send_and_receive([Message(content=content, message_type="train.deploy", dst_node_id=n) for n in nodes], timeout=timeout)
    saved, failed = {}, {}
    for r in replies:
        if r.has_error():
            failed[r.metadata.src_node_id] = r.error.reason
            log(WARNING, "deploy: node %d could not save its shard: %s", r.metadata.src_node_id, r.error.reason)
        else:
            saved[r.metadata.src_node_id] = int(r.content["metrics"]["count"])
    missing = sorted(set(nodes) - set(saved) - set(failed))
    log(INFO, "deploy: %d shard(s) re-encoded with model version %d (%d vectors); failed %s, missing %s",
        len(saved), model_version, sum(saved.values()), sorted(failed) or "none", missing or "none")
    return {"model_version": model_version, "shards_saved": len(saved), "vectors": sum(saved.values()),
            "failed": {str(k): v for k, v in failed.items()}, "missing": missing}


def save_global_model(state: GlobalState, model_version: int, out_dir: Path) -> Path:
    """``global_model.npz``: the encoder as (A, b) and the codebooks, as a shard injects them."""
    a, b = affine_of(state.encoder)
    arrays = {"transform.A": a, "transform.b": b, "model_version": np.asarray(model_version, dtype=np.int64)}
    arrays.update({f"codebook.{k}": v for k, v in state.codebooks.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "global_model.npz"
    tmp = out_dir / "global_model.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _dim(state: GlobalState) -> int:
    return next(iter(state.encoder.values())).shape[-1]


def reference_metrics(spec: IndexSpec, data: Dataset, truth: np.ndarray, k: int, seed: int) -> dict[str, float]:
    """Centralized faiss index trained on the pooled base: what federation should match."""
    index = train_reference_index(spec, data.base, seed)
    _, found = index.search(data.queries, k)
    out = recall_report(found, truth)
    if spec.kind in ("flat", "hnsw"):
        out["distortion"] = 0.0
    elif spec.kind == "ivfflat":  # what the federation trains: the coarse centroids' k-means objective
        coarse, _ = faiss.extract_index_ivf(index).quantizer.search(data.base, 1)
        out["distortion"] = float(coarse.astype(np.float64).mean())
    else:
        # HNSW indexes have no sa_encode: their PQ storage does
        codec = faiss.downcast_index(faiss.downcast_index(index).storage) if spec.kind == "hnswpq" else index
        recon = codec.sa_decode(codec.sa_encode(data.base))
        out["distortion"] = float(((data.base - recon) ** 2).sum(axis=1).mean())
    return out


SOURCE_SIMULATOR = "simulator: true recall of the global model over the union of shards, computed outside the federation"
SOURCE_TRUSTED = "federation, trusted protocol: exact per-query distances from every shard (simulation only)"
SOURCE_ESTIMATE = "federation's private estimate: shards' own held-out recall and distortion, averaged"


class RoundEvaluator:
    """Flower's ``evaluate_fn``, after init (round 0) and every round.

    Always: the federation's private aggregates (distortion, each shard's own recall
    estimate) from the clients' evaluate replies. Then, on evaluation rounds, the truth:
    the simulator's (private protocol, simulated shards), or the trusted protocol's
    per-query answers. In deployment the estimate is all there is.
    """

    def __init__(self, grid: Grid, strategy: Any, cfg: Experiment, data: Dataset, timeout: float) -> None:
        self.grid, self.strategy, self.cfg, self.data, self.timeout = grid, strategy, cfg, data, timeout
        self.rounds: list[dict[str, float]] = []
        self.truth: np.ndarray | None = None
        self.source = SOURCE_ESTIMATE
        self.trusted = cfg.eval.protocol == "trusted"
        self.t0 = time.time()
        self._initial: ArrayRecord | None = None  # round 0's model, until we know whether the shards are simulated
        self.out_dir: Path | None = None  # where the checkpoint goes after every round
        self.resumed_wall_s = 0.0  # wall time of the interrupted run(s) this one continues
        self.init_info: dict[str, Any] = {}  # what the init cost and who withheld (a resumed run reports it too)
        self.stopper = EarlyStop(cfg.stop.tol, cfg.stop.patience) if cfg.stop.tol is not None else None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        offset = self.strategy.round_offset
        if offset and server_round == 0:  # resumed: this round was evaluated before the interruption
            return MetricRecord({})
        server_round += offset
        if server_round == 0:  # Flower's own evaluate pass only follows training rounds
            replies = self.grid.send_and_receive(
                self.strategy.configure_evaluate(0, arrays, client_config(self.cfg), self.grid), timeout=self.timeout
            )
            self.strategy.aggregate_evaluate(0, replies)
        ev = self.strategy.latest_evaluate or {}
        row: dict[str, float] = {"round": server_round}
        if "distortion" in ev:
            row["estimate.distortion"] = float(ev["distortion"])
            row["estimate.relative_distortion"] = float(ev["distortion"]) / max(float(ev["energy"]), 1e-30)
            row.update({f"estimate.{key}": float(ev[f"estimate.{key}"]) for key in ESTIMATE_KEYS if f"estimate.{key}" in ev})
        if server_round % self.cfg.eval.every == 0 or server_round == self.cfg.num_rounds:
            row.update(self._truth_or_estimate(server_round, arrays, row))
        row.update(self.strategy.round_log.get(server_round, {}))
        row["elapsed_s"] = round(time.time() - self.t0, 2)
        self.rounds.append(row)
        if server_round == 0 and "distortion" not in row and not self.trusted:
            self._initial = arrays  # under DP nothing is evaluated before round 1 tells what the shards are
        elif self._initial is not None and self.strategy.all_simulated:
            self.rounds[0].update(self._truth_or_estimate(0, self._initial, self.rounds[0]))
            self._initial = None
        log(
            INFO,
            "[fedvec] round %d/%d  distortion %.4f  10-R@10 %s (private estimate %s)  (%.1fs)",
            server_round, self.cfg.num_rounds, row.get("distortion", row.get("estimate.distortion", float("nan"))),
            f"{row['recall_10_at_10']:.4f}" if "recall_10_at_10" in row else "-",
            f"{row['estimate.recall_10_at_10']:.4f}" if "estimate.recall_10_at_10" in row else "-", row["elapsed_s"],
        )
        if server_round > 0 and self.out_dir is not None:  # after every round, atomically
            logs = {"strategy": self.strategy.checkpoint_logs(), "rounds": self.rounds, "source": self.source,
                    "wall_s": round(time.time() - self.t0, 2) + self.resumed_wall_s, "init": self.init_info}
            checkpoint.save(self.out_dir, server_round, self.cfg.as_dict(), arrays_of(arrays), self.strategy.moments(), logs)
        if self.stopper is not None and self.stopper.update(server_round, row.get("estimate.distortion"), arrays) and server_round > 0:
            log(INFO, "[fedvec] stopping after round %d: %s; the final model is round %s's",
                server_round, self.stopper.report(self.cfg.num_rounds)["reason"], self.stopper.best_round)
            raise StopTraining
        return MetricRecord({k: v for k, v in row.items() if k != "round"})

    def _truth_or_estimate(self, server_round: int, arrays: ArrayRecord, row: dict[str, float]) -> dict[str, float]:
        k = self.cfg.eval.k
        if self.trusted:
            res = federated_search(self.grid, arrays, self.data.queries, k, client_config(self.cfg), self.timeout)
            out = recall_report(res.compressed[1], res.exact[1])
            out["shards_answered"] = len(res.answered)
            out["distortion"] = row.get("estimate.distortion", float("nan"))
            out["relative_distortion"] = row.get("estimate.relative_distortion", float("nan"))
            self.source = SOURCE_TRUSTED
            return out
        if self.strategy.all_simulated:
            if self.truth is None:
                self.truth = exact_neighbours(self.data, k)
            self.source = SOURCE_SIMULATOR
            return true_metrics(GlobalState.from_record(arrays), self.cfg, self.data, self.truth)
        self.source = SOURCE_ESTIMATE
        return {key: row[f"estimate.{key}"] for key in ("distortion", "relative_distortion", *ESTIMATE_KEYS) if f"estimate.{key}" in row}


FINAL_KEYS = ("distortion", "relative_distortion", "recall_1_at_1", "recall_1_at_10", "recall_10_at_10")


def run_federation(grid: Grid, config: dict[str, Any] | Experiment, out_dir: Path) -> Path:
    """Run one experiment end to end; returns the path of summary.json."""
    check_fresh_run_dir(out_dir)
    t0 = time.time()
    cfg = load_experiment(config)  # types and ranges, before the data is even loaded
    data = load_dataset(cfg.data)
    cfg = validate(cfg, data.base.shape[1], data.base.shape[0], None if cfg.init.public_path else data.queries.shape[0])
    spec = cfg.index.spec
    timeout = cfg.timeout_s
    wait_for_nodes(grid, cfg.num_clients, cfg.nodes_wait_s)
    if cfg.eval.protocol == "trusted":
        log(WARNING, "eval.protocol=trusted: every shard returns exact distances to the evaluation queries; "
            "simulation research mode only, recorded in final.privacy (deployed SuperNodes refuse it)")

    state = GlobalState(encoder=initial_weights(data.base.shape[1], cfg.model.kind))
    local = cfg.codebook_update == "local"
    init_withheld: dict[int, str] = {}
    p = cfg.privacy.limits
    checks = ModelChecks(
        spec=spec, dim=data.base.shape[1], data_norm=max_norm(load_public_vectors(cfg, data)),
        bounds=p.model_bounds, examples_digits=p.examples_digits, min_count=p.min_count,
    )
    init_rejected: list[dict] = []
    init_bytes, public_vectors = 0, 0
    resumed = checkpoint.load(Path(cfg.resume).expanduser(), cfg.as_dict()) if cfg.resume else None
    if resumed is not None:  # the model and the init's record come from the checkpoint
        if resumed.round >= cfg.num_rounds:
            raise checkpoint.CheckpointError(f"resume={cfg.resume}: that run finished all {cfg.num_rounds} rounds; nothing to resume")
        state = GlobalState.from_record(record_of(resumed.model))
        init = resumed.logs["init"]
        init_bytes, public_vectors, init_withheld = init["bytes"], init["public_vectors"], {int(n): w for n, w in init["withheld"].items()}
        init_rejected = init["rejected"]
        log(INFO, "resume: continuing %s after round %d of %d", cfg.resume, resumed.round, cfg.num_rounds)
    elif not local and cfg.init.source == "public":
        public_vectors = public_init(state, spec, cfg, data)
    elif not local:
        init_bytes = initialise_codebooks(grid, state, spec, cfg, timeout, init_withheld, checks, init_rejected)

    strategy = instantiate(
        cfg.strategy.flower.kwargs(),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.min_clients,  # Flower waits (forever) for this many
        min_replies=cfg.min_clients,
        seed=cfg.seed,
    )
    strategy.use_model_checks(checks)
    # early stopping reads the estimate after every round; otherwise clients evaluate on eval rounds only
    strategy.evaluate_every(1 if cfg.stop.tol is not None else cfg.eval.every, cfg.num_rounds)
    strategy.rejected.extend(init_rejected)
    if p.secure_aggregation:
        strategy.use_secure_aggregation(SecureSettings(
            threshold=p.secagg_threshold, min_clients=max(p.secagg_min_clients, cfg.min_clients),
            dp=p.dp, empty_sigmas=cfg.privacy.dp_empty_sigmas, num_rounds=cfg.num_rounds, timeout=timeout,
            procrustes_step=cfg.train.procrustes_step,
        ))
    else:
        log(WARNING, "privacy=%s: every client's statistics reach the server unmasked (research simulation only; "
            "deployed SuperNodes refuse it)", cfg.privacy.name)
    evaluator = RoundEvaluator(grid, strategy, cfg, data, timeout)
    evaluator.out_dir = out_dir
    evaluator.init_info = {"bytes": init_bytes, "public_vectors": public_vectors, "withheld": {str(n): w for n, w in init_withheld.items()},
                           "rejected": init_rejected}
    if resumed is not None:
        strategy.restore(resumed.logs["strategy"], resumed.moments, resumed.round)
        evaluator.rounds, evaluator.source, evaluator.resumed_wall_s = resumed.logs["rounds"], resumed.logs["source"], float(resumed.logs["wall_s"])
    try:
        final_arrays = strategy.start(
            grid,
            state.to_record(),
            num_rounds=cfg.num_rounds - (resumed.round if resumed else 0),
            timeout=timeout,
            train_config=client_config(cfg),
            evaluate_config=client_config(cfg),
            evaluate_fn=evaluator,
        ).arrays
    except StopTraining:
        final_arrays = None  # the stopper holds the best model
    stopper = evaluator.stopper
    if stopper is not None and stopper.best_model is not None:
        final_arrays = stopper.best_model  # the best round's model is the one saved and deployed
    final_state = GlobalState.from_record(final_arrays)
    model_version = int(t0)  # seconds since the epoch: newer models have larger versions
    model_path = save_global_model(final_state, model_version, out_dir)
    deployed = deploy_model(grid, final_arrays, cfg, out_dir, model_version, timeout) if cfg.save_shards else None
    final_row = evaluator.rounds[-1]
    if stopper is not None and stopper.best_round is not None:
        final_row = next(r for r in evaluator.rounds if r["round"] == stopper.best_round)
        if "recall_10_at_10" not in final_row:  # not an evaluation round: measure the final model now
            final_row = {**final_row, **evaluator._truth_or_estimate(stopper.best_round, final_arrays, final_row)}
    federated = {k: final_row[k] for k in FINAL_KEYS if k in final_row}
    federated["source"] = evaluator.source
    estimate = {k: final_row[f"estimate.{k}"] for k in FINAL_KEYS if f"estimate.{k}" in final_row}
    if evaluator.source != SOURCE_ESTIMATE:
        estimate["error"] = {k: estimate[k] - federated[k] for k in FINAL_KEYS if k in estimate and k in federated}
    estimate["source"] = SOURCE_ESTIMATE
    uploads = [r["bytes_up_per_client"] for r in evaluator.rounds if "bytes_up_per_client" in r]
    final: dict[str, Any] = {
        "federated": federated,
        "federated_estimate": estimate,
        "bytes_per_vector": spec.code_size(data.base.shape[1]),
        "bytes_up_per_client_per_round": float(np.mean(uploads)) if uploads else 0.0,
        "bytes_up_per_client_init": init_bytes,
        "privacy": privacy_summary(cfg, strategy, init_withheld, public_vectors),
    }
    if cfg.eval.centralized:
        check_stop()
        if strategy.all_simulated:
            truth = evaluator.truth if evaluator.truth is not None else exact_neighbours(data, cfg.eval.k)
            key = reference_key(spec.to_dict(), (data.base, data.queries, truth), cfg.eval.k, cfg.seed,
                                code=inspect.getsource(reference_metrics) + inspect.getsource(train_reference_index))
            cache = Path(cfg.eval.reference_cache).expanduser() if cfg.eval.reference_cache else None
            final["centralized"] = cached_reference(cache, key, lambda: reference_metrics(spec, data, truth, cfg.eval.k, cfg.seed))
        else:
            log(WARNING, "eval.centralized: skipped, the shards are not the simulator's (no pooled data exists to train on)")
    summary = {
        "final": final,
        "rounds": evaluator.rounds,
        "config": cfg.as_dict(),
        "wall_time_s": round(time.time() - t0 + evaluator.resumed_wall_s, 2),
        "resumed_from": {"run_dir": cfg.resume, "round": resumed.round} if resumed else None,
        "global_model": str(model_path),
        "deployed": deployed,
        "missing_nodes": {str(r): ids for r, ids in strategy.missing.items() if ids},
        "rejected_nodes": strategy.rejected,
        "rejected_models": {str(r): why for r, why in strategy.rejected_models.items()},
        "model_bytes": int(sum(a.nbytes for a in arrays_of(final_arrays).values())),
        "stopped": stopper.report(cfg.num_rounds) if stopper is not None else {"reason": "num_rounds (stop.tol=null)", "round": cfg.num_rounds},
    }
    path = write_summary(out_dir, summary)
    for line in final_table(final).splitlines():
        log(INFO, "%s", line)
    return path
