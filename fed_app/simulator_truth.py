"""What only the simulator can compute: the true recall and distortion of the global
model over the union of all shards, and the exact neighbours of the public queries.

In simulation the simulator holds every shard anyway (it made them), so it scores the
global model here, outside the federation; nothing in this module runs on a client or
uses a client's message. In deployment nobody may compute these, and the federation's
private estimate stands in (summary.json says which one a figure is).
"""

from __future__ import annotations


import faiss
import numpy as np

from vector_index.datasets import Dataset
from vector_index.quantizers import build_index_with_errors
from vector_index.topk import merge_topk, recall_report

from .client_tasks import shard_codebooks
from .experiment import Shared
from .encoder import encode, load_encoder
from .local_data import client_partitions
from .state import GlobalState


def exact_neighbours(data: Dataset, k: int) -> np.ndarray:
    """Ids (base row numbers) of each query's true k nearest base vectors."""
    index = faiss.IndexFlatL2(data.base.shape[1])
    index.add(data.base)
    return index.search(data.queries, k)[1]


def true_metrics(state: GlobalState, cfg: Shared, data: Dataset, truth: np.ndarray) -> dict[str, float]:
    """Recall of the merged federated top-k (each shard's index as its client builds it)
    and distortion over the union, for the global model in ``state``."""
    spec = cfg.index.spec
    k = cfg.eval.k
    model = load_encoder(state.encoder)
    zq = encode(model, data.queries)
    if cfg.codebook_update == "local":  # every shard encodes with its own codebooks
        parts = client_partitions(cfg)
    else:
        parts = [np.arange(data.base.shape[0])]
    distances, ids, sse, energy = [], [], 0.0, 0.0
    for rows in parts:
        x = data.base[rows]
        z = encode(model, x)
        books = shard_codebooks(state, x, spec, cfg)
        index, errors = build_index_with_errors(spec, z, rows.astype(np.int64), books, decoded_search=True)
        d, i = index.search(zq, k)
        distances.append(d), ids.append(i)
        sse += float(errors.sum()) if books else 0.0
        energy += float((z.astype(np.float64) ** 2).sum())
    _, found = merge_topk(distances, ids, k)
    out = recall_report(found, truth)
    n = data.base.shape[0]
    out["distortion"] = sse / n
    out["relative_distortion"] = sse / max(energy, 1e-30)
    return out
