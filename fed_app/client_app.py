"""fedvec ClientApp: one per shard. Thin: unpack, check the client's own limits, call
``client_tasks``, pack.

A SuperNode started with ``--node-config 'shard-dir="/path"'`` works on that persisted
shard; in simulation a client rebuilds its partition of the configured data set. Its
privacy limits come from its node config (``max-k=100 min-count=5 ...``, defaults in
``conf/privacy/secure.yaml``) or, in ``python -m simulations.run``, from the simulator
(:func:`make_client_app`); never from a message.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from vector_index.validation import VectorError

# client_tasks, secure_statistics, shard_store and local_data pull in torch, faiss and
# hydra: only the handlers that need them import them, so that a secure-aggregation stage
# (in deployment a fresh ClientApp process per message) starts without them
from .privacy import dp
from .privacy.policy import BUDGET_RECORD, RELEASES_RECORD, ClientPolicy, Refusal
from .privacy.release import Withheld
from .secagg import client as secagg_client
from .secagg import fixed_point
from .secagg.rounds import LAYOUT, SETUP, flatten, layout_record
from .experiment import ClientView
from .settings import received_config, search_request
from .state import GlobalState, arrays_of, encoder_record, record_of

SESSION_RECORD, INPUT_RECORD, NOISE_RECORD = "secagg-session", "secagg-input", "secagg-noise"  # Context.state


def _vectors(cfg: ClientView, context: Context):
    from . import shard_store
    from .local_data import client_shard

    nc = context.node_config
    if "shard-dir" in nc:
        return shard_store.shard_vectors(shard_store.shard_path(nc, None))
    return client_shard(cfg, int(nc["partition-id"]), int(nc["num-partitions"]))


def _unpack(msg: Message, context: Context, pol: ClientPolicy):
    """The config, the global model (refused unless it passes this node's own model
    checks) and this shard's vectors and ids."""
    from .model_guard import check_model, max_norm

    cfg = received_config(msg.content["config"])
    pol.check_work(cfg.train.local_epochs, cfg.init.kmeans_iters)
    arrays = {k: v for name in ("arrays", "codebooks") if name in msg.content for k, v in msg.content[name].items()}
    state = GlobalState.from_record(ArrayRecord(arrays))
    x, ids = _vectors(cfg, context)
    dim = next(iter(state.encoder.values())).shape[-1]
    if x.shape[1] != dim:
        raise VectorError(f"this shard holds {x.shape[1]}-d vectors but the federation trains on {dim}-d vectors")
    try:
        # the data bound, rounded up to a power of 2: a refusal (or a probing server's
        # accept/refuse oracle) reveals at most the exponent of this shard's largest norm
        bound = 2.0 ** math.ceil(math.log2(max(max_norm(x), 2.0**-126)))
        check_model(state, cfg.index.spec, x.shape[1], bound, pol.model_bounds)
    except VectorError as e:
        raise Refusal("model", f"the model the server sent is refused: {e}") from None
    return cfg, state, x, ids


def _spend(context: Context, policy: ClientPolicy, queries: int) -> None:
    """Count queries against this node's budget for the run (Context.state persists
    across the run's messages on this node, in simulation and deployment alike)."""
    record = context.state.config_records.get(BUDGET_RECORD, ConfigRecord({"answered": 0}))
    record["answered"] = policy.spend(int(record["answered"]), queries)
    context.state[BUDGET_RECORD] = record


def _secure_only(msg: Message, pol: ClientPolicy) -> bool:
    """True: answer through secure aggregation. A node with secure-aggregation on refuses
    to send its statistics any other way."""
    if SETUP in msg.content.config_records:
        return True
    if pol.secure_aggregation:
        raise Refusal(
            "secure-aggregation",
            "this node sends its statistics only inside a secure sum; run the server with privacy=secure or privacy=secagg",
        )
    return False


def secure_setup(msg: Message, context: Context, pol: ClientPolicy, stats: dict[str, np.ndarray], sensitivity: dict[str, float]) -> Message:
    """Keep the statistics (and the noise this node will add) on the node; answer with
    fresh public keys and the statistics' shapes, nothing of their values."""
    session, public = secagg_client.start(str(msg.content[SETUP]["session"]), int(context.node_id))
    stds = dp.noise_stds(sensitivity, pol.noise_multiplier()) if pol.dp else {k: 0.0 for k in stats}
    context.state[SESSION_RECORD] = ConfigRecord(session.to_config())
    context.state[INPUT_RECORD] = record_of({k: np.asarray(v, dtype=np.float64) for k, v in stats.items()})
    context.state[NOISE_RECORD] = ConfigRecord({k: float(v) for k, v in stds.items()})
    reply = {"session": session.session, "c-pk": public["c-pk"], "s-pk": public["s-pk"], "fixed-point-bits": pol.fixed_point_bits}
    info = {"simulated-partition": float("shard-dir" not in context.node_config), "noise-multiplier": pol.noise_multiplier() if pol.dp else 0.0}
    content = RecordDict({
        SETUP: ConfigRecord(reply), LAYOUT: layout_record(stats), "noise": ConfigRecord({k: float(v) for k, v in stds.items()}),
        "policy": ConfigRecord(pol.as_record()), "info": ConfigRecord(info),
    })
    return Message(content=content, reply_to=msg)


def secure_stage(msg: Message, context: Context, pol: ClientPolicy) -> Message:
    """Stages 2-4 of secure aggregation (``fed_app.secagg.client``), on this node's session."""
    rec = msg.content["secagg"]
    if SESSION_RECORD not in context.state.config_records:
        raise Refusal("secure-aggregation", "no secure-aggregation session is open on this node")
    session = secagg_client.Session.from_config(dict(context.state[SESSION_RECORD].items()))
    if str(rec["session"]) != session.session:
        raise Refusal("secure-aggregation", "this message belongs to another secure-aggregation session than the one open here")
    limits = secagg_client.Limits(pol.secagg_min_clients, pol.secagg_threshold)
    stage = str(rec["stage"])
    try:
        if stage == "share":
            sent = secagg_client.share_keys(
                session, [int(n) for n in rec["roster"]], [bytes(b) for b in rec["c-pk"]], [bytes(b) for b in rec["s-pk"]], int(rec["threshold"]), limits
            )
            content = RecordDict({"secagg": ConfigRecord({"dst": [str(n) for n in sent], "ciphertexts": list(sent.values())})})
        elif stage == "mask":
            stats = arrays_of(context.state[INPUT_RECORD])
            stds = {k: float(v) for k, v in context.state[NOISE_RECORD].items()}
            if any(v > 0 for v in stds.values()):
                used = context.state.config_records.get(RELEASES_RECORD, ConfigRecord({"released": 0}))
                used["released"] = pol.spend_release(int(used["released"]))
                context.state[RELEASES_RECORD] = used
                stats = dp.add_noise_share(stats, stds, session.threshold)
            x, _ = fixed_point.encode(flatten(stats), pol.fixed_point_bits, len(session.roster))
            y = secagg_client.mask(session, [int(n) for n in rec["senders"]], [bytes(b) for b in rec["ciphertexts"]], x)
            del context.state[INPUT_RECORD]
            content = RecordDict({"masked": record_of({"y": y})})
        elif stage == "unmask":
            shares = secagg_client.unmask(session, [int(n) for n in rec["survivors"]])
            content = RecordDict({"secagg": ConfigRecord({"peers": [str(p) for p, _, _ in shares], "kinds": [k for _, k, _ in shares], "shares": [b for _, _, b in shares]})})
        else:
            raise Refusal("secure-aggregation", f"unknown secure-aggregation stage {stage!r}")
    except (secagg_client.ProtocolError, fixed_point.EncodingError) as e:
        raise Refusal("secure-aggregation", str(e)) from None
    context.state[SESSION_RECORD] = ConfigRecord(session.to_config())
    return Message(content=content, reply_to=msg)


def refusal_reply(msg: Message, refusal: Refusal) -> Message:
    return Message(content=RecordDict({"refusal": ConfigRecord({"limit": refusal.limit, "reason": refusal.reason})}), reply_to=msg)


def withheld_reply(msg: Message, why: Withheld) -> Message:
    """Nothing from the shard, and why (counted as a reply that contributes nothing)."""
    content = RecordDict({"withheld": ConfigRecord({"reason": str(why)}), "metrics": MetricRecord({"num-examples": 0.0})})
    return Message(content=content, reply_to=msg)


class _FedvecApp(ClientApp):
    """Pickles as the call that builds it: Flower's simulation ships the ClientApp to a
    Ray worker with every message, and the handlers (closures) would otherwise travel
    by value each time (10 KB, ~0.6 ms of the driver's time per message)."""

    def __init__(self, policy: ClientPolicy | None, mods: list | None) -> None:
        super().__init__(mods=mods or [])
        self._made_with = (policy, mods)

    def __reduce__(self):
        return make_client_app, self._made_with


def make_client_app(policy: ClientPolicy | None = None, mods: list | None = None) -> ClientApp:
    """The ClientApp. ``policy`` given: the simulator's clients hold these limits; else
    every message reads them from the SuperNode's node config. ``mods``: Flower client
    mods around every handler (the fault tests' hostile clients)."""
    app = _FedvecApp(policy, mods)

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
        if pol.secure_aggregation:
            raise Refusal(
                "secure-aggregation",
                "init: k-FED sends this shard's own centroids, which cannot be summed securely; run with init.source=public",
            )
        from . import client_tasks

        cfg, state, x, _ = _unpack(msg, context, pol)
        if cfg.init_level is None:
            raise Refusal("config", "init: the message names no init-level")
        out = client_tasks.init_centroids(state, x, cfg.init_level, cfg, pol)
        content = RecordDict({"init": record_of(out), "metrics": MetricRecord({"num-examples": pol.round_examples(x.shape[0])})})
        return Message(content=content, reply_to=msg)

    @app.train()
    @guarded
    def train(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        from . import client_tasks, secure_statistics

        secure = _secure_only(msg, pol)
        cfg, state, x, _ = _unpack(msg, context, pol)
        if secure:
            return secure_setup(msg, context, pol, *secure_statistics.train_statistics(state, x, cfg, pol))
        weights, update, metrics = client_tasks.train(state, x, cfg, pol)
        content = RecordDict({"arrays": encoder_record(weights), "codebook-update": record_of(update), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.train("deploy")
    @guarded
    def deploy(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        """After the last round: re-encode this shard with the global model and save it."""
        from . import shard_store

        cfg, state, x, ids = _unpack(msg, context, pol)
        path = shard_store.shard_path(context.node_config, cfg.deploy)
        if path is None or cfg.deploy is None:
            raise VectorError("deploy: no shard-dir in this SuperNode's node config and no deploy.shard-root sent")
        stats = shard_store.deploy(path, state, x, ids, cfg, cfg.deploy.model_version, pol.model_bounds)
        for key in ("count", "bytes-on-disk"):  # sizes, reported only as roughly as num-examples
            stats[key] = pol.round_examples(stats[key])
        return Message(content=RecordDict({"metrics": MetricRecord(stats)}), reply_to=msg)

    @app.evaluate()
    @guarded
    def evaluate(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        from . import client_tasks, secure_statistics

        secure = _secure_only(msg, pol)
        cfg, state, x, ids = _unpack(msg, context, pol)
        if secure:
            return secure_setup(msg, context, pol, *secure_statistics.evaluate_statistics(state, x, ids, cfg, pol))
        metrics = client_tasks.evaluate(state, x, ids, cfg, pol)
        metrics["simulated-partition"] = float("shard-dir" not in context.node_config)
        content = RecordDict({"metrics": MetricRecord(metrics), "policy": ConfigRecord(pol.as_record())})
        return Message(content=content, reply_to=msg)

    @app.query("secagg")
    @guarded
    def secagg(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        return secure_stage(msg, context, pol)

    @app.query()
    @guarded
    def query(msg: Message, context: Context, pol: ClientPolicy) -> Message:
        """``mode=search``: answer from the persisted shard (compressed distances on the
        node's grid); else the trusted evaluation protocol, if this node allows it."""
        from . import client_tasks, shard_store

        queries = msg.content["queries"]["vectors"].numpy()
        if msg.content["config"].get("mode") == "search":
            req = search_request(msg.content["config"])
            path = shard_store.shard_path(context.node_config, req.deploy)
            if path is None:
                raise VectorError("search: this SuperNode has no shard-dir in its node config")
            if req.k is not None:
                pol.check_k(req.k)
                pol.check_candidates(req.rerank)
            _spend(context, pol, queries.shape[0])
            out, version = shard_store.search(path, queries, req, pol)
            content = RecordDict({"results": record_of(out), "metrics": MetricRecord({"model-version": version})})
            return Message(content=content, reply_to=msg)
        if not pol.allow_trusted_eval:
            raise Refusal(
                "trusted-eval",
                "this node does not answer the trusted evaluation protocol (exact distances to server-chosen "
                "vectors); it is for simulations only: run with eval.protocol=private",
            )
        cfg, state, x, ids = _unpack(msg, context, pol)
        k = cfg.eval.k
        pol.check_k(k)
        _spend(context, pol, queries.shape[0])
        out = client_tasks.search(state, x, ids, queries, k, cfg)
        return Message(content=RecordDict({"results": record_of(out)}), reply_to=msg)

    return app


app = make_client_app()
