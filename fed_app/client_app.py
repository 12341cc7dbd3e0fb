"""fedvec ClientApp: one per shard. Thin: unpack, call ``client_tasks``, pack.

A SuperNode started with ``--node-config 'shard-dir="/path"'`` works on that persisted
shard; in simulation a client rebuilds its partition of the configured data set.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from vector_index.validation import VectorError

from . import client_tasks, shard_store
from .local_data import client_shard
from .settings import received_config
from .state import GlobalState, encoder_record, record_of

app = ClientApp()


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


@app.train("init")
def init(msg: Message, context: Context) -> Message:
    cfg, state, x, _ = _unpack(msg, context)
    out = client_tasks.init_centroids(state, x, str(cfg["init-level"]), cfg)
    content = RecordDict({"init": record_of(out), "metrics": MetricRecord({"num-examples": x.shape[0]})})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, state, x, _ = _unpack(msg, context)
    weights, update, metrics = client_tasks.train(state, x, cfg)
    content = RecordDict(
        {
            "arrays": encoder_record(weights),
            "codebook-update": record_of(update),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


@app.train("deploy")
def deploy(msg: Message, context: Context) -> Message:
    """After the last round: re-encode this shard with the global model and save it."""
    cfg, state, x, ids = _unpack(msg, context)
    path = shard_store.shard_path(context.node_config, cfg)
    if path is None:
        raise VectorError("deploy: no shard-dir in this SuperNode's node config and no deploy.shard-root sent")
    stats = shard_store.deploy(path, state, x, ids, cfg, int(cfg["deploy"]["model-version"]))
    return Message(content=RecordDict({"metrics": MetricRecord(stats)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, state, x, _ = _unpack(msg, context)
    return Message(content=RecordDict({"metrics": MetricRecord(client_tasks.distortion(state, x, cfg))}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``mode=search``: answer from the persisted shard; else evaluate the current model."""
    cfg = received_config(msg.content["config"])
    queries = msg.content["queries"]["vectors"].numpy()
    if cfg.get("mode") == "search":
        path = shard_store.shard_path(context.node_config, cfg)
        if path is None:
            raise VectorError("search: this SuperNode has no shard-dir in its node config")
        out, version = shard_store.search(path, queries, cfg)
        content = RecordDict({"results": record_of(out), "metrics": MetricRecord({"model-version": version})})
        return Message(content=content, reply_to=msg)
    cfg, state, x, ids = _unpack(msg, context)
    out = client_tasks.search(state, x, ids, queries, int(cfg["eval"]["k"]), cfg)
    return Message(content=RecordDict({"results": record_of(out)}), reply_to=msg)
