"""fedvec ClientApp: one per shard. Thin: unpack, check the client's own limits, call
``client_tasks``, pack.

A SuperNode started with ``--node-config 'shard-dir="/path"'`` works on that persisted
shard; in simulation a client rebuilds its partition of the configured data set. Its
privacy limits come from its node config (``max-k=100 min-count=5 ...``, defaults in
``conf/privacy/default.yaml``) or, in ``python -m simulations.run``, from the simulator
(:func:`make_client_app`); never from a message.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from vector_index.validation import VectorError

from . import client_tasks, shard_store
from .local_data import client_shard
from .privacy.policy import BUDGET_RECORD, ClientPolicy, Refusal
from .privacy.release import Withheld
from .settings import received_config
from .state import GlobalState, encoder_record, record_of


def _vectors(cfg: dict, context: Context):
    nc = context.node_config
    if "shard-dir" in nc:
        return shard_store.shard_vectors(shard_store.shard_path(nc, cfg))
    return client_shard(cfg, int(nc["partition-id"]), int(nc["num-partitions"]))


def _unpack(msg: Message, context: Context):
    cfg = received_config(msg.content["config"])
    arrays = {k: v for name in ("arrays", "codebooks") if name in msg.content for k, v in msg.content[name].items()}
    state = GlobalState.from_record(ArrayRecord(arrays))
    x, ids = _vectors(cfg, context)
    dim = next(iter(state.encoder.values())).shape[-1]
    if x.shape[1] != dim:
        raise VectorError(f"this shard holds {x.shape[1]}-d vectors but the federation trains on {dim}-d vectors")
    return cfg, state, x, ids


def _spend(context: Context, policy: ClientPolicy, queries: int) -> None:
    """Count queries against this node's budget for the run (Context.state persists
    across the run's messages on this node, in simulation and deployment alike)."""
    record = context.state.config_records.get(BUDGET_RECORD, ConfigRecord({"answered": 0}))
    record["answered"] = policy.spend(int(record["answered"]), queries)
    context.state[BUDGET_RECORD] = record


def refusal_reply(msg: Message, refusal: Refusal) -> Message:
    return Message(content=RecordDict({"refusal": ConfigRecord({"limit": refusal.limit, "reason": refusal.reason})}), reply_to=msg)


def withheld_reply(msg: Message, why: Withheld) -> Message:
    """Nothing from the shard, and why (counted as a reply that contributes nothing)."""
    content = RecordDict({"withheld": ConfigRecord({"reason": str(why)}), "metrics": MetricRecord({"num-examples": 0.0})})
    return Message(content=content, reply_to=msg)


def make_client_app(policy: ClientPolicy | None = None) -> ClientApp:
    """The ClientApp. ``policy`` given: the simulator's clients hold these limits; else
    every message reads them from the SuperNode's node config."""
    app = ClientApp()

    def limits(context: Context) -> ClientPolicy:
        return policy if policy is not None else ClientPolicy.from_node_config(dict(context.node_config))

    def guarded(handler: Callable[[Message, Context, ClientPolicy], Message]) -> Callable[[Message, Context], Message]:
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context, limits(context))
            except Refusal as refusal:
                return refusal_reply(msg, refusal)
            except Withheld as why:
                return withheld_reply(msg, why)

        return run

    @app.train("init")
    @guarded
    def init(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        cfg, state, x, _ = _unpack(msg, context)
        out = client_tasks.init_centroids(state, x, str(cfg["init-level"]), cfg, pol)
        content = RecordDict({"init": record_of(out), "metrics": MetricRecord({"num-examples": pol.round_examples(x.shape[0])})})
        return Message(content=content, reply_to=msg)

    @app.train()
    @guarded
    def train(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        cfg, state, x, _ = _unpack(msg, context)
        weights, update, metrics = client_tasks.train(state, x, cfg, pol)
        content = RecordDict({"arrays": encoder_record(weights), "codebook-update": record_of(update), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.train("deploy")
    @guarded
    def deploy(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        """After the last round: re-encode this shard with the global model and save it."""
        cfg, state, x, ids = _unpack(msg, context)
        path = shard_store.shard_path(context.node_config, cfg)
        if path is None:
            raise VectorError("deploy: no shard-dir in this SuperNode's node config and no deploy.shard-root sent")
        stats = shard_store.deploy(path, state, x, ids, cfg, int(cfg["deploy"]["model-version"]))
        for key in ("count", "bytes-on-disk"):  # sizes, reported only as roughly as num-examples
            stats[key] = pol.round_examples(stats[key])
        return Message(content=RecordDict({"metrics": MetricRecord(stats)}), reply_to=msg)

    @app.evaluate()
    @guarded
    def evaluate(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        cfg, state, x, ids = _unpack(msg, context)
        metrics = client_tasks.evaluate(state, x, ids, cfg, pol)
        metrics["simulated-partition"] = float("shard-dir" not in context.node_config)
        content = RecordDict({"metrics": MetricRecord(metrics), "policy": ConfigRecord(pol.as_record())})
        return Message(content=content, reply_to=msg)

    @app.query()
    @guarded
    def query(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        """``mode=search``: answer from the persisted shard (compressed distances on the
        node's grid); else the trusted evaluation protocol, if this node allows it."""
        cfg = received_config(msg.content["config"])
        queries = msg.content["queries"]["vectors"].numpy()
        if cfg.get("mode") == "search":
            path = shard_store.shard_path(context.node_config, cfg)
            if path is None:
                raise VectorError("search: this SuperNode has no shard-dir in its node config")
            if "radius" not in cfg:
                pol.check_k(int(cfg["k"]))
                pol.check_candidates(int(cfg.get("rerank", 0)))
            _spend(context, pol, queries.shape[0])
            out, version = shard_store.search(path, queries, cfg, pol)
            content = RecordDict({"results": record_of(out), "metrics": MetricRecord({"model-version": version})})
            return Message(content=content, reply_to=msg)
        if not pol.allow_trusted_eval:
            raise Refusal(
                "trusted-eval",
                "this node does not answer the trusted evaluation protocol (exact distances to server-chosen "
                "vectors); it is for simulations only: run with eval.protocol=private",
            )
        k = int(cfg["eval"]["k"])
        pol.check_k(k)
        _spend(context, pol, queries.shape[0])
        cfg, state, x, ids = _unpack(msg, context)
        out = client_tasks.search(state, x, ids, queries, k, cfg)
        return Message(content=RecordDict({"results": record_of(out)}), reply_to=msg)

    return app


app = make_client_app()
