"""The attack suite: fedvec's real protocol in a real Flower simulation, with the server
played by an attacker that records everything it receives and rewrites what it sends.

One run of a setting (:func:`run_setting`) trains the federation through a
:class:`~simulations.attacks.ServerProxy`, then, still as the server, sends its own
requests (:func:`active_probes`): a raised k on the evaluation path, crafted probe
queries, a raised k and a huge radius in search mode, and probes within the nodes'
limits. :func:`score` then plays every attack on the recordings:

- trilateration of every (query, id, distance) the server received, against the raw
  vectors and, for answers computed on compressed codes, against the stored codes;
- an exposure scan of every array row received (init centroids, Lloyd sums / counts,
  refined centroids) against every vector's encoded sub-vectors, and of init centroid
  rows against whole encoded vectors;
- small cells: counts in (0, min_count) among everything received.

Used by ``tests/privacy`` (assertions) and ``simulations/benchmark_privacy`` (table).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fed_app.config import compose_config
from fed_app.encoder import encode, load_encoder
from fed_app.federated_search import federated_search, search_federation
from fed_app.federation import run_federation
from fed_app.local_data import load_dataset
from fed_app.settings import client_config
from fed_app.state import ENCODER, record_of
from vector_index.datasets import Dataset
from vector_index.quantizers import reconstruct

from .attacks import Exchange, ServerProxy, count_recovered, exposed_targets, rows_of, small_cells, trilaterate
from .run import simulate

RECOVERY_TOL = 1e-3  # a vector counts as recovered within 0.1% of its norm
EXPOSURE_TOL = 1e-4  # a received row "is" a raw (encoded) sub-vector within 0.01% of its norm
SMALL_CELL = 5  # counts below this (the default min-count) expose few vectors
NUM_PROBES = 200  # crafted probe queries per probing attack
RAISED_K = 1000  # what the active server asks for: 10x the default max-k (and whole small shards)
SEARCH_K = 100  # within-limits probing asks for the default max-k
HUGE_RADIUS = 1e9

BUDGET_BATCHES = 5  # the budget attack asks for NUM_PROBES queries at a time, at most this often

ACTIVE_ATTACKS = ("raised_k", "crafted_probes", "search_raised_k", "search_radius", "search_probes", "exhaust_budget")


@dataclass
class AttackReport:
    """What the attacker got in one setting: vectors recovered exactly per attack."""

    setting: str
    num_vectors: int
    recovered: dict[str, int] = field(default_factory=dict)  # attack -> raw vectors recovered
    codes: dict[str, int] = field(default_factory=dict)  # attack -> stored codes recovered (compressed answers)
    refusals: dict[str, int] = field(default_factory=dict)  # attack -> nodes that refused it
    limits: dict[str, list[str]] = field(default_factory=dict)  # attack -> the limits named in refusals
    small_cells: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


def rewrite_to_raise_k(k: int) -> Callable[[Message], Message]:
    """An active server during training: ask for a huge k and the trusted protocol."""

    def rewrite(msg: Message) -> Message:
        for record in msg.content.config_records.values():
            if "eval.k" in record:
                record["eval.k"] = k
                record["eval.protocol"] = "trusted"
        return msg

    return rewrite


def probe_vectors(data: Dataset, n: int, seed: int) -> np.ndarray:
    """Crafted queries: random points spread like the base (the server knows its scale
    from the public queries)."""
    rng = np.random.default_rng(seed)
    centre, scale = data.queries.mean(axis=0), data.queries.std(axis=0)
    return (centre + scale * rng.normal(size=(n, data.base.shape[1]))).astype(np.float32)


def active_probes(proxy: ServerProxy, cfg: dict[str, Any], data: Dataset, out_dir: Path) -> dict[str, list[Exchange]]:
    """After training, the server sends its own requests; returns the exchanges of each."""
    timeout = float(cfg["timeout_s"])
    last_eval = [ex for ex in proxy.exchanges if ex.message_type == "evaluate"][-1]
    arrays = record_of(last_eval.sent_arrays["arrays"])
    probes = probe_vectors(data, NUM_PROBES, int(cfg["seed"]) + 1)
    big_k = min(RAISED_K, data.base.shape[0])
    asked = {**dict(client_config(cfg).items()), "eval.protocol": "trusted"}
    raised = ConfigRecord({**asked, "eval.k": big_k})
    shards = ConfigRecord({"deploy.shard-root": str(out_dir / "shards")})
    attacks: dict[str, Callable[[], Any]] = {
        "raised_k": lambda: federated_search(proxy, arrays, data.queries, big_k, raised, timeout),
        "crafted_probes": lambda: federated_search(proxy, arrays, probes, 10, ConfigRecord(asked), timeout),
        "search_raised_k": lambda: search_federation(proxy, data.queries, shards, timeout, k=big_k),
        "search_radius": lambda: search_federation(proxy, data.queries, shards, timeout, radius=HUGE_RADIUS),
        "search_probes": lambda: search_federation(proxy, probes, shards, timeout, k=SEARCH_K),
    }

    def exhaust_budget() -> None:
        for _ in range(BUDGET_BATCHES):
            attacks["search_probes"]()

    attacks["exhaust_budget"] = exhaust_budget
    out = {}
    for name, attack in attacks.items():
        start = len(proxy.exchanges)
        try:
            attack()
        except RuntimeError:  # every node refused or failed: the exchanges say which
            pass
        out[name] = proxy.exchanges[start:]
    return out


def attacker_app(cfg: dict[str, Any], out_dir: Path, holder: dict[str, Any], rewrite: Callable[[Message], Message] | None, probe: bool) -> ServerApp:
    """fedvec's own server code on a recording (and maybe rewriting) grid, then probes."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        proxy = ServerProxy(grid, rewrite)
        holder["proxy"] = proxy
        run_federation(proxy, cfg, out_dir)
        proxy.rewrite = None  # the probes say exactly what they ask
        training = len(proxy.exchanges)
        holder["probes"] = active_probes(proxy, cfg, data_of(cfg), out_dir) if probe else {}
        holder["training"] = proxy.exchanges[:training]

    return app


def data_of(cfg: dict[str, Any]) -> Dataset:
    return load_dataset(cfg["data"])


def run_setting(name: str, overrides: list[str], out_dir: Path, *, rewrite: Callable[[Message], Message] | None = None, probe: bool = True) -> AttackReport:
    """Train one federation under ``overrides`` with the attacker as server; score it."""
    cfg = compose_config(overrides)
    holder: dict[str, Any] = {}
    path = simulate(cfg, out_dir, server_app=attacker_app(cfg, out_dir, holder, rewrite, probe))
    report = score(name, cfg, data_of(cfg), holder["training"], holder["probes"], out_dir)
    report.summary = json.loads(path.read_text())
    return report


# -- scoring ---------------------------------------------------------------------------


def _encoder_of(ex: Exchange) -> dict[str, np.ndarray]:
    """The encoder the client encoded with for this reply: its own updated one if it sent
    it back (training), else the one the server sent (init). The server knows both."""
    for arrays in (ex.reply_arrays.get("arrays", {}), ex.sent_arrays.get("arrays", {})):
        weights = {k[len(ENCODER):]: v for k, v in arrays.items() if k.startswith(ENCODER)}
        if weights:
            return weights
    return {}


def exposure(training: list[Exchange], base: np.ndarray, m: int) -> tuple[int, int]:
    """(sub-vectors, whole vectors) of the base that some received row equals, each reply
    scanned in the space of the encoder it was computed with."""
    dsub = base.shape[1] // m
    subs: set[tuple[int, int]] = set()
    full: set[int] = set()
    encoded: dict[str, np.ndarray] = {}
    for ex in training:
        if ex.error is not None or not ({"init", "codebook-update"} & set(ex.reply_arrays)):
            continue
        weights = _encoder_of(ex)
        key = hashlib.sha1(b"".join(weights[k].tobytes() for k in sorted(weights))).hexdigest()
        if key not in encoded:
            encoded[key] = encode(load_encoder(weights), base)
        z = encoded[key]
        for j, rows in enumerate(rows_of([ex], "pq", m)):
            subs.update((j, int(t)) for t in exposed_targets(rows, z[:, j * dsub:(j + 1) * dsub], EXPOSURE_TOL))
        if "init" in ex.reply_arrays and ex.sent_config.get("init-level", "pq") == "pq":
            cents = ex.reply_arrays["init"]["centroids"]
            full.update(int(t) for t in exposed_targets(cents.transpose(1, 0, 2).reshape(-1, base.shape[1]), z, EXPOSURE_TOL))
    return len(subs), len(full)


def _hits(ex: Exchange, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(query index, id, distance) of one answer, kNN or range."""
    res = ex.reply_arrays.get("results", {})
    if f"{prefix}distances" not in res:
        return None
    d, i = res[f"{prefix}distances"], res[f"{prefix}ids"]
    if "lims" in res and not prefix:
        qi = np.repeat(np.arange(res["lims"].size - 1), np.diff(res["lims"]))
    else:
        qi = np.repeat(np.arange(d.shape[0]), d.shape[1])
    return qi, i.ravel(), d.ravel()


def _trilaterate_all(exchanges: list[Exchange], prefix: str, transform: Callable[[np.ndarray], np.ndarray]) -> dict[int, np.ndarray]:
    """Pool every answer's hits (queries mapped by ``transform`` into the space the
    distances live in) and trilaterate each id."""
    queries, qi, ids, dist = [], [], [], []
    offset = 0
    for ex in exchanges:
        hits = _hits(ex, prefix)
        if hits is None or "queries" not in ex.sent_arrays:
            continue
        q = transform(ex.sent_arrays["queries"]["vectors"])
        queries.append(q)
        qi.append(hits[0] + offset), ids.append(hits[1]), dist.append(hits[2])
        offset += q.shape[0]
    if not queries:
        return {}
    return trilaterate(np.concatenate(queries), np.concatenate(qi), np.concatenate(ids), np.concatenate(dist))


def score(name: str, cfg: dict[str, Any], data: Dataset, training: list[Exchange], probes: dict[str, list[Exchange]], out_dir: Path) -> AttackReport:
    ids = np.arange(data.base.shape[0])
    report = AttackReport(setting=name, num_vectors=data.base.shape[0])

    # trilateration of the exact distances the evaluation path returned
    report.recovered["trilateration_training"] = count_recovered(
        _trilaterate_all(training, "exact.", lambda q: q), ids, data.base, RECOVERY_TOL
    )
    # exposure: every row received, against every vector encoded as that reply was
    report.recovered["exposure_subvectors"], report.recovered["exposure_full_vectors"] = exposure(
        training, data.base, int(cfg["index"]["m"])
    )
    report.small_cells = sum(
        small_cells(rec[key], SMALL_CELL)
        for ex in training if ex.error is None
        for rec in ex.reply_arrays.values() for key in rec if key.endswith("counts")
    )

    # active attacks: exact distances (evaluation path), compressed ones (search mode)
    model = np.load(out_dir / "global_model.npz") if (out_dir / "global_model.npz").is_file() else None
    for attack, exs in probes.items():
        report.refusals[attack] = len({ex.node for ex in exs if "refusal" in ex.reply_values})
        report.limits[attack] = sorted({str(ex.reply_values["refusal"]["limit"]) for ex in exs if "refusal" in ex.reply_values})
        if not attack.startswith("search"):
            report.recovered[attack] = count_recovered(_trilaterate_all(exs, "exact.", lambda q: q), ids, data.base, RECOVERY_TOL)
            continue
        a, b = model["transform.A"].astype(np.float64), model["transform.b"].astype(np.float64)
        books = {k[len("codebook."):]: model[k] for k in model.files if k.startswith("codebook.")}
        est = _trilaterate_all(exs, "", lambda q: q.astype(np.float64) @ a.T + b)
        z = data.base.astype(np.float64) @ a.T + b
        codes = reconstruct(z.astype(np.float32), books).astype(np.float64) if books else z
        report.codes[attack] = count_recovered(est, ids, codes, RECOVERY_TOL)
        raw = {i: np.linalg.solve(a, e - b) for i, e in est.items()}
        report.recovered[attack] = count_recovered(raw, ids, data.base, RECOVERY_TOL)
    return report
