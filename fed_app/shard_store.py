"""A client's persistent shard: where it lives, deploying a global model into it, and
answering searches from it. Plain functions over ``vector_index.store.Shard``.

In deployment a SuperNode's node config names its shard (``shard-dir``); in simulation
each client writes its partition to ``<run output>/shards/client-<partition-id>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vector_index.model_checks import ModelBounds
from vector_index.store import Shard
from vector_index.topk import rerank_exact
from vector_index.validation import VectorError

from .client_tasks import shard_codebooks
from .experiment import ClientView, SearchRequest, ShardRoot
from .encoder import affine_of
from .privacy.policy import ClientPolicy, Refusal

RAW_KINDS = ("flat", "hnsw", "ivfflat")  # index kinds that store raw vectors: their distances are exact
from .state import GlobalState


def shard_path(node_config: dict[str, Any], where: ShardRoot | None) -> Path | None:
    """The node's own shard directory, else the simulation's per-partition one."""
    if "shard-dir" in node_config:
        return Path(str(node_config["shard-dir"])).expanduser()
    if where is not None and "partition-id" in node_config:
        return Path(where.shard_root) / f"client-{int(node_config['partition-id'])}"
    return None


_WARM: dict[Path, tuple[frozenset[str], Shard]] = {}  # shards this process opened and verified, by version stamp
WARM_SHARDS = 16  # a node serves one shard; a simulation worker serves its share of the partitions in turn


def open_shard(path: Path) -> Shard:
    """The shard's latest version, opened and verified once per process and kept warm.

    A search or training message then costs only the check that no newer version was
    committed (by a deploy, an import or a rollback), which reopens and re-verifies:
    a listing of the version manifests, and the dataset's latest version only when that
    listing changed. Callers only read the returned shard.
    """
    if not Shard.exists(path):
        raise VectorError(f"shard-dir {str(path)!r} holds no shard; create one with `python -m vector_index import <vectors> {path}`")
    key = path.resolve()
    stamp = Shard.version_stamp(path)  # before opening: a commit during the open changes it for the next call
    warm = _WARM.get(key)
    if warm is not None and (warm[0] == stamp or warm[1].version == Shard.latest_version(path)):
        _WARM[key] = (stamp, warm[1])
        return warm[1]
    shard = Shard.open(path)
    _WARM.pop(key, None)
    while len(_WARM) >= WARM_SHARDS:
        _WARM.pop(next(iter(_WARM)))
    _WARM[key] = (stamp, shard)
    return shard


def shard_vectors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(raw vectors, ids) of a persisted shard: what training and exact evaluation use."""
    shard = open_shard(path)
    ids = shard.ids.copy()
    return shard.vectors(ids), ids


def deploy(path: Path, state: GlobalState, x: np.ndarray, ids: np.ndarray, cfg: ClientView, model_version: int, bounds: ModelBounds) -> dict[str, float]:
    """Re-encode the shard with the final global model and save it atomically.

    A simulated client with no shard yet creates one from its partition first.
    """
    spec = cfg.index.spec
    if Shard.exists(path):
        shard = Shard.open(path)
        if shard.spec.kind != spec.kind:
            raise VectorError(f"shard {str(path)!r} is a {shard.spec.kind!r} index but the federation trained index={spec.kind}")
    else:
        shard = Shard.create(path, x.shape[1], spec, metadata={"source": "fedvec simulation partition"}, commit=False)
        shard.add(x, ids)
    books = shard_codebooks(state, x, spec, cfg)
    shard.reencode(books, affine_of(state.encoder), model_version, bounds)
    version = shard.save()
    stats = shard.stats()
    return {"count": float(stats["count"]), "version": float(version), "model-version": float(model_version), "bytes-on-disk": float(stats["bytes_on_disk"])}


def search(path: Path, queries: np.ndarray, req: SearchRequest, policy: ClientPolicy) -> tuple[dict[str, np.ndarray], int]:
    """Top-k (``k``) or range (``radius``) hits of the persisted, encoded shard.

    Distances are those of the compressed codes (never of the raw vectors), rounded to
    the node's grid; a range result set beyond the node's limit is refused whole. With
    ``rerank`` > k, the ``rerank`` best compressed candidates are re-ranked on the raw
    vectors here: the answer carries their exact order, not their exact distances.
    """
    shard = open_shard(path)
    if not shard.encoded:
        raise VectorError(f"shard {str(path)!r} has not received a global model yet; train the federation first")
    if shard.spec.kind in RAW_KINDS:
        raise Refusal(
            "index-kind",
            f"this shard's index ({shard.spec.kind}) stores raw vectors, so its distances to a query would be exact; "
            "it answers searches only with a compressed index (pq, ivfpq, hnswpq, opqpq)",
        )
    if req.radius is not None:
        lims, d, i = shard.range_search(queries, req.radius)
        policy.check_range(lims)
        return {"lims": lims.astype(np.int64), "distances": policy.round_distances(d), "ids": i}, int(shard.model_version)
    k = int(req.k)  # type: ignore[arg-type]  # the request has k or radius
    rerank = min(req.rerank, len(shard))
    if rerank > k:  # exact re-ranking of the compressed candidates, here, on raw vectors
        d, i = shard.search(queries, rerank)
        raw = np.zeros((*i.shape, shard.dim), dtype=np.float32)
        found = i >= 0
        raw[found] = shard.vectors(i[found])
        d, i = rerank_exact(queries, raw, d, i, k)
    else:
        d, i = shard.search(queries, k)
    return {"distances": policy.round_distances(d), "ids": i}, int(shard.model_version)
