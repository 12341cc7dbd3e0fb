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
- small cells: counts in (0, min_count) among everything received;
- under secure aggregation, the same exposure scan of the sums the server decodes
  (:func:`~simulations.attacks.decoded_secure_sums`, rebuilt from the recorded masked
  inputs and unmasking shares: what the server holds, not a client's reply);
- differencing (:func:`differencing_probes` then
  :func:`~simulations.attacks.difference_candidates`): the server subtracts what it
  holds about a set of clients, or about the same clients under other codebooks, and
  reads a raw sub-vector off every cell whose isolated count is one;
- federation-wide small cells (:func:`~simulations.attacks.federation_candidates`):
  a cell of the aggregate whose total count is one holds one raw sub-vector.

Used by ``tests/privacy`` (assertions) and ``simulations/benchmark_privacy`` (table).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_app.config import compose_config, load_experiment, validate
from fed_app.encoder import encode, load_encoder
from fed_app.federated_search import federated_search, search_federation
from fed_app.federation import run_federation
from fed_app.local_data import load_dataset
from fed_app.secagg.rounds import SETUP, new_session, secure_sum, setup_record
from fed_app.experiment import Experiment
from fed_app.settings import client_config
from fed_app.state import CODEBOOK, ENCODER, record_of
from vector_index.datasets import Dataset
from vector_index.quantizers import reconstruct

from .attacks import (
    Candidates,
    DecodedSum,
    Exchange,
    Observation,
    ServerProxy,
    count_recovered,
    decoded_secure_sums,
    difference_candidates,
    digest,
    exposed_targets,
    federation_candidates,
    rows_of,
    small_cells,
    trilaterate,
)
from .run import simulate

RECOVERY_TOL = 1e-3  # a vector counts as recovered within 0.1% of its norm
EXPOSURE_TOL = 1e-4  # a received row "is" a raw (encoded) sub-vector within 0.01% of its norm
SMALL_CELL = 5  # counts below this (the default min-count) expose few vectors
NUM_PROBES = 200  # crafted probe queries per probing attack
RAISED_K = 1000  # what the active server asks for: 10x the default max-k (and whole small shards)
SEARCH_K = 100  # within-limits probing asks for the default max-k
HUGE_RADIUS = 1e9

BUDGET_BATCHES = 5  # the budget attack asks for NUM_PROBES queries at a time, at most this often
LEAVE_OUT = 2  # differencing under secure aggregation: leave-one-out sums, one per victim

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
    candidate_cells: dict[str, int] = field(default_factory=dict)  # attack -> cells whose (isolated) count read as one
    candidate_error: dict[str, float | None] = field(default_factory=dict)  # attack -> median relative error of those cells' sums
    secure_sums: list[tuple[int, float]] = field(default_factory=list)  # per decoded secure sum: survivors, its decoded "clients" entry
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


def active_probes(proxy: ServerProxy, cfg: Experiment, data: Dataset, out_dir: Path) -> dict[str, list[Exchange]]:
    """After training, the server sends its own requests; returns the exchanges of each."""
    timeout = cfg.timeout_s
    last_eval = [ex for ex in proxy.exchanges if ex.message_type == "evaluate"][-1]
    arrays = record_of(last_eval.sent_arrays["arrays"])
    probes = probe_vectors(data, NUM_PROBES, cfg.seed + 1)
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


def differencing_probes(proxy: ServerProxy, cfg: Experiment) -> list[Exchange]:
    """After training, an active server asks again for Lloyd statistics, choosing who
    answers and with which model, so that differences of what it gets back isolate
    few vectors. Every request carries ``train.local_epochs=0``: no client moves its encoder, so
    every statistic is in the space of the encoder sent (the final one).

    - the final model, every node;
    - the codebooks of the last round (one Lloyd step before the final ones), every node;
    - under secure aggregation also the final model over every node but one, for
      ``LEAVE_OUT`` victims (the plain protocol already hands over each client's own
      statistics).

    Under secure aggregation each request is a session of its own, run with the
    server's own ``secure_sum``; under DP each is a release the clients count.
    """
    evals = [ex for ex in proxy.exchanges if ex.message_type == "evaluate" and "arrays" in ex.sent_arrays]
    trains = [ex for ex in proxy.exchanges if ex.message_type == "train" and ex.sent_arrays.get("codebooks")]
    if not evals or not trains:
        return []
    final = evals[-1].sent_arrays["arrays"]
    encoder = {k: v for k, v in final.items() if k.startswith(ENCODER)}
    books = [{k: v for k, v in final.items() if k.startswith(CODEBOOK)}, trains[-1].sent_arrays["codebooks"]]
    config = {**dict(client_config(cfg).items()), "server-round": int(trains[-1].sent_config.get("server-round", 0)), "train.local_epochs": 0}
    p = cfg.privacy.limits
    secure = p.secure_aggregation
    nodes = sorted(int(n) for n in proxy.get_node_ids())
    requests = [(books[0], nodes), (books[1], nodes)]
    if secure:
        requests += [(books[0], [n for n in nodes if n != v]) for v in nodes[:LEAVE_OUT]]
    timeout = cfg.timeout_s
    start = len(proxy.exchanges)
    for i, (codebooks, group) in enumerate(requests):
        session = new_session() if secure else None

        def content() -> RecordDict:
            c = RecordDict({"arrays": record_of(encoder), "codebooks": record_of(codebooks), "config": ConfigRecord(dict(config))})
            if session is not None:
                c[SETUP] = setup_record(session)
            return c

        replies = list(proxy.send_and_receive([Message(content=content(), message_type="train", dst_node_id=n) for n in group], timeout=timeout))
        if session is not None:
            secure_sum(proxy, session, replies, p.secagg_threshold, p.secagg_min_clients, timeout, f"differencing request {i}")
    return proxy.exchanges[start:]


def attacker_app(
    cfg: Experiment, out_dir: Path, holder: dict[str, Any], rewrite: Callable[[Message], Message] | None, probe: bool, differencing: bool = False
) -> ServerApp:
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
        holder["differencing"] = differencing_probes(proxy, cfg) if differencing else []
        holder["training"] = proxy.exchanges[:training]

    return app


def data_of(cfg: Experiment) -> Dataset:
    return load_dataset(cfg.data)


def run_setting(
    name: str, overrides: list[str], out_dir: Path, *, rewrite: Callable[[Message], Message] | None = None, probe: bool = True, differencing: bool = False
) -> AttackReport:
    """Train one federation under ``overrides`` with the attacker as server; score it.
    ``differencing``: after training (and the probes) the server also asks for the
    statistics :func:`differencing_probes` differences."""
    cfg = load_experiment(compose_config(overrides))
    data = data_of(cfg)
    cfg = validate(cfg, data.base.shape[1], data.base.shape[0])  # index.m=auto resolved, as the server does
    holder: dict[str, Any] = {}
    path = simulate(cfg, out_dir, server_app=attacker_app(cfg, out_dir, holder, rewrite, probe, differencing))
    report = score(name, cfg, data_of(cfg), holder["training"], holder["probes"], out_dir, holder["differencing"])
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


class Encodings:
    """The base encoded with each encoder the server saw, once per encoder."""

    def __init__(self, base: np.ndarray) -> None:
        self.base = base
        self.weights: dict[str, dict[str, np.ndarray]] = {}
        self._encoded: dict[str, np.ndarray] = {}

    def key(self, weights: dict[str, np.ndarray]) -> str:
        k = digest(weights)
        self.weights.setdefault(k, weights)
        return k

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._encoded:
            self._encoded[key] = encode(load_encoder(self.weights[key]), self.base)
        return self._encoded[key]


def _sent_encoder(ex: Exchange) -> dict[str, np.ndarray]:
    return {k[len(ENCODER):]: v for k, v in ex.sent_arrays.get("arrays", {}).items() if k.startswith(ENCODER)}


def exposure(training: list[Exchange], base: np.ndarray, m: int, sums: list[DecodedSum] | None = None, enc: Encodings | None = None) -> tuple[int, int]:
    """(sub-vectors, whole vectors) of the base that some received row equals, each reply
    scanned in the space of the encoder it was computed with. ``sums``: also the cell
    means (sums / counts) of the decoded secure sums, in the space of the encoder sent."""
    enc = enc or Encodings(base)
    dsub = base.shape[1] // m
    subs: set[tuple[int, int]] = set()
    full: set[int] = set()

    def scan(rows_per_subspace: list[np.ndarray], z: np.ndarray) -> None:
        for j, rows in enumerate(rows_per_subspace):
            subs.update((j, int(t)) for t in exposed_targets(rows, z[:, j * dsub:(j + 1) * dsub], EXPOSURE_TOL))

    for ex in training:
        if ex.error is not None or not ({"init", "codebook-update"} & set(ex.reply_arrays)):
            continue
        z = enc[enc.key(_encoder_of(ex))]
        scan(rows_of([ex], "pq", m), z)
        if "init" in ex.reply_arrays and ex.sent_config.get("init-level", "pq") == "pq":
            cents = ex.reply_arrays["init"]["centroids"]
            full.update(int(t) for t in exposed_targets(cents.transpose(1, 0, 2).reshape(-1, base.shape[1]), z, EXPOSURE_TOL))
    for s in sums or []:
        if "codebook.pq.sums" in s.arrays:
            counts = s.arrays["codebook.pq.counts"]
            with np.errstate(invalid="ignore", divide="ignore"):
                means = s.arrays["codebook.pq.sums"] / counts[..., None]
            live = counts >= 0.5
            scan([means[j][live[j]] for j in range(m)], enc[enc.key(_sent_encoder(s.setup[0]))])
    return len(subs), len(full)


def lloyd_observations(exchanges: list[Exchange], sums: list[DecodedSum], enc: Encodings, level: str = "pq") -> list[Observation]:
    """The Lloyd statistics the server holds: every plain reply (one client, in the space
    of the encoder it sent back) and every decoded secure sum (its survivors, in the
    space of the encoder the server sent: exact under DP and with ``train.local_epochs=0``)."""

    def model(ex: Exchange) -> str:
        config = {k: v for k, v in ex.sent_config.items() if k not in ("session", "stage")}
        return digest(ex.sent_arrays.get("arrays", {}), ex.sent_arrays.get("codebooks", {}), config)

    out = []
    for ex in exchanges:
        update = ex.reply_arrays.get("codebook-update", {})
        if ex.error is None and f"{level}.sums" in update:
            out.append(Observation(frozenset({ex.node}), model(ex), (enc.key(_encoder_of(ex)),), update[f"{level}.sums"].astype(np.float64),
                                   update[f"{level}.counts"].astype(np.float64), ex.batch, summed=False))
    for s in sums:
        if f"codebook.{level}.sums" in s.arrays:
            ex = s.setup[0]
            out.append(Observation(s.clients, model(ex), (enc.key(_sent_encoder(ex)),), s.arrays[f"codebook.{level}.sums"],
                                   s.arrays[f"codebook.{level}.counts"], ex.batch, summed=True))
    return out


def recovered_subvectors(candidates: Candidates, enc: Encodings, m: int) -> tuple[int, float | None]:
    """Distinct (sub-space, vector) pairs some candidate row equals (``EXPOSURE_TOL``), each
    row tested in the encoder space(s) it came with; and the median over candidate rows of
    the relative L2 error to the nearest real sub-vector (None without candidates): how far
    from recovery the attack got (under DP, the noise)."""
    dsub = enc.base.shape[1] // m
    rows: dict[tuple[str, int], list[np.ndarray]] = {}
    for spaces, per in candidates:
        for space in spaces:
            for j, r in enumerate(per):
                if r.size:
                    rows.setdefault((space, j), []).append(r)
    found: set[tuple[int, int]] = set()
    errors = []
    for (space, j), rs in rows.items():
        z = np.ascontiguousarray(enc[space][:, j * dsub:(j + 1) * dsub])
        r = np.concatenate(rs)
        found.update((j, int(t)) for t in exposed_targets(r, z, EXPOSURE_TOL))
        index = faiss.IndexFlatL2(dsub)
        index.add(z)
        _, nearest = index.search(np.ascontiguousarray(r, dtype=np.float32), 1)
        t = z[nearest[:, 0]].astype(np.float64)
        errors.append(np.linalg.norm(r - t, axis=1) / np.maximum(np.linalg.norm(t, axis=1), 1e-12))
    return len(found), (float(np.median(np.concatenate(errors))) if errors else None)


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


def score(
    name: str, cfg: Experiment, data: Dataset, training: list[Exchange], probes: dict[str, list[Exchange]], out_dir: Path,
    differencing: list[Exchange] | None = None,
) -> AttackReport:
    ids = np.arange(data.base.shape[0])
    report = AttackReport(setting=name, num_vectors=data.base.shape[0])
    m = int(cfg.index.m)  # type: ignore[arg-type]  # the attacked indexes are PQ
    enc = Encodings(data.base)
    sums = decoded_secure_sums(training)

    # trilateration of the exact distances the evaluation path returned
    report.recovered["trilateration_training"] = count_recovered(
        _trilaterate_all(training, "exact.", lambda q: q), ids, data.base, RECOVERY_TOL
    )
    # exposure: every row received, against every vector encoded as that reply was
    report.recovered["exposure_subvectors"], report.recovered["exposure_full_vectors"] = exposure(training, data.base, m, sums, enc)
    # differencing and federation-wide count-one cells, over training and the differencing requests
    extra = list(differencing or [])
    extra_sums = decoded_secure_sums(extra)
    report.secure_sums = [(len(s.clients), float(s.arrays["clients"][0])) for s in sums + extra_sums if "clients" in s.arrays]
    observed = lloyd_observations(training + extra, sums + extra_sums, enc)
    for attack, found in (("difference_subvectors", difference_candidates(observed)), ("federation_cells_subvectors", federation_candidates(observed))):
        report.candidate_cells[attack] = sum(r.shape[0] for _, per in found for r in per)
        report.recovered[attack], report.candidate_error[attack] = recovered_subvectors(found, enc, m)
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
