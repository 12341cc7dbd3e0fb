"""fedvec ClientApp: one per shard. Thin: unpack, call ``client_tasks``, pack."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import client_tasks
from .local_data import client_shard
from .settings import received_config
from .state import GlobalState, encoder_record, record_of

app = ClientApp()


def _unpack(msg: Message, context: Context):
    cfg = received_config(msg.content["config"])
    arrays = {k: v for name in ("arrays", "codebooks") if name in msg.content for k, v in msg.content[name].items()}
    state = GlobalState.from_record(ArrayRecord(arrays))
    nc = context.node_config
    x, ids = client_shard(cfg, int(nc["partition-id"]), int(nc["num-partitions"]))
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


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, state, x, _ = _unpack(msg, context)
    return Message(content=RecordDict({"metrics": MetricRecord(client_tasks.distortion(state, x, cfg))}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, state, x, ids = _unpack(msg, context)
    queries = msg.content["queries"]["vectors"].numpy()
    out = client_tasks.search(state, x, ids, queries, int(cfg["eval"]["k"]), cfg)
    return Message(content=RecordDict({"results": record_of(out)}), reply_to=msg)
