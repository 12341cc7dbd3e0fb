"""Building blocks of the attack suite: a curious (or active) server tries to recover
clients' raw vectors from what the federation lets it see.

Two halves:

- ``ServerProxy``: wraps the Flower ``Grid`` a ServerApp receives. It records every
  request/reply pair (what the server sent, what came back) and can rewrite outgoing
  messages, so an *active* server (one that changes ``k``, configs or query vectors) is
  simulated with the unchanged fedvec server code.
- Pure numpy/faiss functions over arrays (no Flower inside): trilateration of vectors
  from search hits, and exposure scans that check whether any array row the server
  received equals a raw (sub-)vector.
- What the server holds under secure aggregation: :func:`decoded_secure_sums` rebuilds
  every sum from the recorded traffic alone (the server's own unmasking code), and the
  differencing / count-one-cell attacks (:func:`difference_candidates`,
  :func:`federation_candidates`) read raw sub-vectors off sums and their differences.

Everything the attacks compare against must live in the same space as what the clients
send: with a trained encoder, targets are the *encoded* vectors; for the ``pq`` level of
an IVF index, the residuals to the coarse centroids.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

NO_REPLY = "no reply (timeout)"


# -- recording and rewriting the server's traffic -------------------------------------


@dataclass(eq=False)  # identity: fields hold numpy arrays, and each exchange is one event
class Exchange:
    """One message the server sent to one node, and that node's reply.

    ``error`` is ``reply.error.reason`` for an error reply, or ``NO_REPLY`` when the
    node did not answer before the timeout (then both reply dicts are empty).
    """

    message_type: str  # e.g. "train", "train.init", "evaluate", "query"
    node: int  # the destination / replying node id
    sent_arrays: dict[str, dict[str, np.ndarray]]  # record name -> key -> array
    sent_config: dict[str, Any]  # all ConfigRecords sent, merged (flat keys as sent)
    reply_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    reply_values: dict[str, dict[str, Any]] = field(default_factory=dict)  # Metric+ConfigRecords
    error: str | None = None
    batch: int = -1  # which send_and_receive / push_messages call sent it (0, 1, ...)


def _arrays_of(content: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    # .numpy() deserialises into a fresh array: later changes to the message don't leak in
    return {name: {k: a.numpy() for k, a in rec.items()} for name, rec in content.array_records.items()}


def _sent_snapshot(msg: Message) -> Exchange:
    content = msg.content
    config: dict[str, Any] = {}
    for rec in content.config_records.values():
        config.update(copy.deepcopy(dict(rec)))
    return Exchange(
        message_type=msg.metadata.message_type,
        node=int(msg.metadata.dst_node_id),
        sent_arrays=_arrays_of(content),
        sent_config=config,
        error=NO_REPLY,
    )


def _fill_reply(ex: Exchange, reply: Message) -> None:
    ex.node = int(reply.metadata.src_node_id)
    if reply.has_error():
        ex.error = reply.error.reason
        return
    ex.error = None
    if reply.has_content():
        content = reply.content
        ex.reply_arrays = _arrays_of(content)
        values = {name: copy.deepcopy(dict(rec)) for name, rec in content.metric_records.items()}
        values.update({name: copy.deepcopy(dict(rec)) for name, rec in content.config_records.items()})
        ex.reply_values = values


class ServerProxy(Grid):
    """A ``Grid`` that records every exchange and may rewrite outgoing messages.

    Use it wherever the ServerApp uses its grid: ``main(ServerProxy(grid, rewrite), ctx)``.
    ``rewrite(msg) -> msg`` sees every outgoing message (it may modify it in place and
    return it, or return a new one). Before ``rewrite`` runs, each message gets its own
    deep copy of its content: fedvec sends one ``RecordDict`` object to every node, and
    an in-place change for one node must neither hit the others nor the server's own
    objects.

    Replies are matched to requests by ``reply.metadata.reply_to_message_id``; Flower
    assigns ``message_id`` only while pushing (in place, on the message object), so the
    ids are read after the inner grid has sent. Should a grid not set them, replies fall
    back to matching by node id, which is unique within one ``send_and_receive`` batch.
    """

    def __init__(self, grid: Grid, rewrite: Callable[[Message], Message] | None = None) -> None:
        self._grid = grid
        self.rewrite = rewrite
        self.exchanges: list[Exchange] = []
        self._pending: dict[str, Exchange] = {}  # message id -> exchange, for push/pull
        self._batches = 0

    # -- the two calls fedvec and Flower's strategies make
    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = self._prepare(messages)
        exchanges = self._snapshots(sent)  # as sent, before the grid sees them
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        by_id = {m.metadata.message_id: ex for m, ex in zip(sent, exchanges) if m.metadata.message_id}
        by_node = {ex.node: ex for ex in exchanges}
        for reply in replies:
            ex = by_id.get(reply.metadata.reply_to_message_id) or by_node.get(int(reply.metadata.src_node_id))
            if ex is not None:
                _fill_reply(ex, reply)
        self.exchanges += exchanges
        return replies

    # -- the rest of the Grid interface, by delegation
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        sent = self._prepare(messages)
        exchanges = self._snapshots(sent)
        ids = list(self._grid.push_messages(sent))
        for m, ex in zip(sent, exchanges):
            self.exchanges.append(ex)
            if m.metadata.message_id:
                self._pending[m.metadata.message_id] = ex
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            ex = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if ex is not None:
                _fill_reply(ex, reply)
        return replies

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self) -> Iterable[Any]:
        return self._grid.get_nodes()

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found normally; guard against recursion while
        # the instance is half-built (copy/pickle look attributes up before __init__)
        if name == "_grid":
            raise AttributeError(name)
        return getattr(self._grid, name)

    # -- reading the record
    def replies(self, message_type: str | None = None) -> list[Exchange]:
        """Exchanges that got a good reply; ``message_type`` "train" also matches "train.*"."""
        return [
            ex for ex in self.exchanges
            if ex.error is None
            and (message_type is None or ex.message_type == message_type or ex.message_type.startswith(message_type + "."))
        ]

    def _snapshots(self, sent: list[Message]) -> list[Exchange]:
        out = [_sent_snapshot(m) for m in sent]
        for ex in out:
            ex.batch = self._batches
        self._batches += 1
        return out

    def _prepare(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        if self.rewrite is None:
            return out
        rewritten = []
        for msg in out:
            if msg.has_content():
                msg.content = copy.deepcopy(msg.content)
            rewritten.append(self.rewrite(msg))
        return rewritten


# -- trilateration: vectors from (query, id, distance) hits ---------------------------


def trilaterate(
    queries: np.ndarray,
    query_index: np.ndarray,
    ids: np.ndarray,
    sq_distances: np.ndarray,
    min_equations: int | None = None,
) -> dict[int, np.ndarray]:
    """Recover vectors from search hits "id is at squared L2 distance d from query i".

    ``||q_i - x||^2 = d_i`` is quadratic in x, but subtracting the mean equation removes
    ``||x||^2``: ``2 (q_i - q_mean) . x = (||q_i||^2 - mean ||q||^2) - (d_i - d_mean)``,
    linear in x, solved by least squares in float64. That needs d+1 distinct queries per
    id in general position (default ``min_equations``); ids whose system has rank < d are
    skipped, as are padding ids (< 0). Repeated (query, id) pairs count once.
    Returns id -> estimated vector (float64).
    """
    q = np.asarray(queries, dtype=np.float64)
    d = q.shape[1]
    need = max(int(min_equations) if min_equations is not None else d + 1, 2)
    qi = np.asarray(query_index, dtype=np.int64).ravel()
    hid = np.asarray(ids, dtype=np.int64).ravel()
    dist = np.asarray(sq_distances, dtype=np.float64).ravel()
    keep = (hid >= 0) & np.isfinite(dist) & (qi >= 0) & (qi < q.shape[0])
    qi, hid, dist = qi[keep], hid[keep], dist[keep]
    # one equation per distinct (id, query): sort by both, drop repeats
    order = np.lexsort((qi, hid))
    qi, hid, dist = qi[order], hid[order], dist[order]
    first = np.ones(hid.size, dtype=bool)
    first[1:] = (hid[1:] != hid[:-1]) | (qi[1:] != qi[:-1])
    qi, hid, dist = qi[first], hid[first], dist[first]
    # group by id; loop only over ids with enough equations
    uniq, start, count = np.unique(hid, return_index=True, return_counts=True)
    qnorm = np.einsum("ij,ij->i", q, q)
    out: dict[int, np.ndarray] = {}
    for i in np.nonzero(count >= need)[0]:
        sl = slice(start[i], start[i] + count[i])
        qq, nn, dd = q[qi[sl]], qnorm[qi[sl]], dist[sl]
        a = 2.0 * (qq - qq.mean(axis=0))
        b = (nn - nn.mean()) - (dd - dd.mean())
        x, _, rank, _ = np.linalg.lstsq(a, b, rcond=None)
        if rank >= d:
            out[int(uniq[i])] = x
    return out


def count_recovered(estimates: dict[int, np.ndarray], ids: np.ndarray, vectors: np.ndarray, tol: float) -> int:
    """How many estimates lie within ``tol * ||x||`` (L2) of the true vector x with that id.

    Estimates for ids not in ``ids`` do not count (an attacker's guess about nothing).
    """
    row = {int(i): r for r, i in enumerate(np.asarray(ids).ravel())}
    v = np.asarray(vectors, dtype=np.float64)
    n = 0
    for i, est in estimates.items():
        r = row.get(int(i))
        if r is None:
            continue
        x = v[r]
        if np.linalg.norm(np.asarray(est, dtype=np.float64) - x) <= tol * max(float(np.linalg.norm(x)), 1e-12):
            n += 1
    return n


# -- exposure: does any received row equal a raw (sub-)vector? ------------------------


def exposure_scan(rows: np.ndarray, targets: np.ndarray, tol: float, candidates: int = 8) -> int:
    """How many distinct target rows some received row equals (see :func:`exposed_targets`)."""
    return int(exposed_targets(rows, targets, tol, candidates).size)


def exposed_targets(rows: np.ndarray, targets: np.ndarray, tol: float, candidates: int = 8) -> np.ndarray:
    """Indices of the distinct target rows matched by some received row, within relative
    L2 tolerance: ``||row - t|| <= tol * ||t||``.

    This is the test for "a centroid, a Lloyd sum / count or a codebook row the server
    received *is* a raw sub-vector" (a cell of one vector, a client's lone point).
    Rows that are all zero or not finite are ignored (empty cells, 0/0). faiss
    ``IndexFlatL2`` proposes the ``candidates`` nearest targets per row; the test itself
    is in float64, since float32 faiss distances (``|x|^2 + |y|^2 - 2xy``) carry errors
    of ~1e-7 |x|^2, larger than the squared tolerance for small ``tol``.
    """
    t = np.asarray(targets, dtype=np.float64)
    r = np.asarray(rows, dtype=np.float64)
    none = np.zeros(0, dtype=np.int64)
    if t.ndim != 2 or r.ndim != 2 or t.shape[0] == 0 or r.shape[0] == 0:
        return none
    if r.shape[1] != t.shape[1]:
        raise ValueError(f"rows have {r.shape[1]} columns, targets {t.shape[1]}")
    r = r[np.isfinite(r).all(axis=1) & (r != 0).any(axis=1)]
    if r.shape[0] == 0:
        return none
    index = faiss.IndexFlatL2(t.shape[1])
    index.add(np.ascontiguousarray(t, dtype=np.float32))
    k = min(int(candidates), t.shape[0])
    _, cand = index.search(np.ascontiguousarray(r, dtype=np.float32), k)
    cand_rows = np.repeat(np.arange(r.shape[0]), k)
    cand = cand.ravel()
    ok = cand >= 0
    cand_rows, cand = cand_rows[ok], cand[ok]
    err = np.linalg.norm(r[cand_rows] - t[cand], axis=1)
    limit = tol * np.maximum(np.linalg.norm(t[cand], axis=1), 1e-12)
    return np.unique(cand[err <= limit]).astype(np.int64)


def exposure_scan_subspaces(rows_per_subspace: Sequence[np.ndarray], vectors: np.ndarray, tol: float) -> int:
    """Number of (vector, sub-space) pairs whose sub-vector some received row equals.

    ``rows_per_subspace[j]`` holds rows ``[r_j, dsub]`` of sub-space j (as ``rows_of``
    returns them); the targets of sub-space j are ``vectors[:, j*dsub:(j+1)*dsub]``.
    """
    v = np.asarray(vectors)
    m = len(rows_per_subspace)
    if m == 0:
        return 0
    if v.shape[1] % m:
        raise ValueError(f"{v.shape[1]}-d vectors do not split into {m} sub-spaces")
    dsub = v.shape[1] // m
    return sum(exposure_scan(rows, v[:, j * dsub:(j + 1) * dsub], tol) for j, rows in enumerate(rows_per_subspace))


def small_cells(counts: np.ndarray, below: int) -> int:
    """Entries with ``0 < count < below``: cells whose statistics describe so few
    vectors that a sum or centroid is (nearly) a raw sub-vector."""
    c = np.asarray(counts)
    return int(np.count_nonzero((c > 0) & (c < below)))


def rows_of(exchanges: Iterable[Exchange], level: str = "pq", m: int | None = None) -> list[np.ndarray]:
    """Every row of ``level``'s sub-spaces the server received, one ``[r_j, dsub]``
    float64 array per sub-space j (M arrays; M = 1 for the IVF ``coarse`` level).

    Collected from good replies only, from fedvec's keys:
    - record ``init`` (``centroids`` [M, K', dsub]), when the request's config
      ``init-level`` is ``level`` (a request without it counts for any level);
    - ``<level>.centroids`` [M, K, dsub] in any record: rows as they are;
    - ``<level>.sums`` with ``<level>.counts`` [M, K] in the same record: sums / counts
      for counts > 0 (the centroid of the client's own vectors in that cell).
    ``m`` fixes M when known (so no rows still gives M empty arrays) and is checked.
    """
    per: list[list[np.ndarray]] = []
    dsub: int | None = None

    def add(books: np.ndarray, mask: np.ndarray | None = None) -> None:
        nonlocal dsub, m
        books = np.asarray(books, dtype=np.float64)
        if books.ndim != 3:
            raise ValueError(f"expected [M, K, dsub], got shape {books.shape}")
        if m is None:
            m = books.shape[0]
        if books.shape[0] != m or (dsub is not None and books.shape[2] != dsub):
            raise ValueError(f"{level}: shape {books.shape} does not match M={m}, dsub={dsub}")
        dsub = books.shape[2]
        while len(per) < m:
            per.append([])
        for j in range(m):
            per[j].append(books[j] if mask is None else books[j][mask[j]])

    for ex in exchanges:
        if ex.error is not None:
            continue
        for name, rec in ex.reply_arrays.items():
            if name == "init" and "centroids" in rec and ex.sent_config.get("init-level", level) == level:
                add(rec["centroids"])
            if f"{level}.centroids" in rec:
                add(rec[f"{level}.centroids"])
            if f"{level}.sums" in rec and f"{level}.counts" in rec:
                counts = np.asarray(rec[f"{level}.counts"], dtype=np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    means = np.asarray(rec[f"{level}.sums"], dtype=np.float64) / counts[..., None]
                add(means, counts > 0)
    if m is None:
        return []
    width = dsub if dsub is not None else 0
    return [np.concatenate(p) if p else np.zeros((0, width)) for p in (per + [[] for _ in range(m - len(per))])]


# -- secure aggregation: the sums the server decodes ----------------------------------


@dataclass(eq=False)
class DecodedSum:
    """One completed secure-aggregation session, decoded from the recorded traffic."""

    session: str
    clients: frozenset[int]  # the survivors: whose inputs the sum holds
    arrays: dict[str, np.ndarray]  # name -> summed array (as the layout names them)
    setup: list[Exchange]  # the session's setup exchanges (train / evaluate): what was asked


def _good(ex: Exchange) -> bool:
    return ex.error is None and "refusal" not in ex.reply_values


def decoded_secure_sums(exchanges: Iterable[Exchange]) -> list[DecodedSum]:
    """Every secure sum the recorded traffic completed, decoded the way the server does
    (``fed_app.secagg``) from what it received and nothing else: the setup replies' mask
    keys and layouts, the survivors' masked uint64 inputs (``masked``/``y``), and the
    unmasking shares. A session that aborted (or never reached unmasking) gives none.

    This is the aggregate a curious server holds under ``privacy=secagg`` / ``secure``:
    the attacks below read it, not any one client's reply.
    """
    from fed_app.secagg import fixed_point
    from fed_app.secagg.rounds import LAYOUT, MESSAGE_TYPE, SETUP, read_layout, unflatten
    from fed_app.secagg.server import Aborted, unmask_sum

    sessions: dict[str, dict[str, list[Exchange]]] = {}
    for ex in exchanges:
        stage = str(ex.sent_config.get("stage", ""))
        if (ex.message_type == MESSAGE_TYPE and stage in ("share", "mask", "unmask")) or (ex.message_type != MESSAGE_TYPE and stage == "setup"):
            sessions.setdefault(str(ex.sent_config.get("session", "")), {}).setdefault(stage, []).append(ex)
    out = []
    for sid, st in sessions.items():
        setups = [ex for ex in st.get("setup", []) if _good(ex) and LAYOUT in ex.reply_values and SETUP in ex.reply_values]
        shares = st.get("share", [])
        if not setups or not shares:
            continue
        asked = shares[0].sent_config
        roster, s_pk, t = [int(n) for n in asked["roster"]], [bytes(b) for b in asked["s-pk"]], int(asked["threshold"])
        by_node = {ex.node: ex for ex in setups}
        layout = tuple(read_layout(by_node[roster[0]].reply_values[LAYOUT]))
        bits = int(by_node[roster[0]].reply_values[SETUP]["fixed-point-bits"])
        length = sum(int(np.prod(s, dtype=np.int64)) for _, s in layout)
        shared = sorted(ex.node for ex in shares if _good(ex))
        masked = {}
        for ex in st.get("mask", []):
            y = ex.reply_arrays.get("masked", {}).get("y") if _good(ex) else None
            if y is not None and y.dtype == np.uint64 and y.size == length:
                masked[ex.node] = y
        revealed = {}
        for ex in st.get("unmask", []):
            rec = ex.reply_values.get("secagg", {}) if _good(ex) else {}
            if "peers" in rec:
                revealed[ex.node] = [(int(p), str(k), bytes(s)) for p, k, s in zip(rec["peers"], rec["kinds"], rec["shares"])]
        if not masked:
            continue
        try:
            total = unmask_sum(sid, roster, s_pk, t, masked, revealed, [v for v in shared if v not in masked])
        except Aborted:
            continue
        out.append(DecodedSum(sid, frozenset(masked), unflatten(fixed_point.decode(total, bits), list(layout)), setups))
    return out


# -- differencing and small cells of sums: raw sub-vectors from counts of one --------


ONE_TOL = 0.5  # a (noisy) count within this of 1 reads as "one vector"


@dataclass(eq=False)
class Observation:
    """Lloyd statistics of one codebook level that the server holds about a set of
    clients: one client's own reply (plain protocol) or a decoded secure sum."""

    clients: frozenset[int]
    model: str  # digest of everything the request carried (encoder, codebooks, config)
    spaces: tuple[str, ...]  # digest(s) of the encoder(s) the sub-vectors were encoded with, as far as the server knows
    sums: np.ndarray  # [M, K, dsub]
    counts: np.ndarray  # [M, K]; real-valued under DP (noisy)
    batch: int  # the send batch that asked for it (one round, or one session)
    summed: bool  # a sum over clients (secure aggregation), not one client's reply


def digest(*arrays: dict[str, Any]) -> str:
    """A stable identity for dicts of arrays and config values (what was sent)."""
    h = hashlib.sha1()
    for d in arrays:
        for k in sorted(d):
            v = d[k]
            h.update(k.encode() + (np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray) else repr(v).encode()))
    return h.hexdigest()


def count_one_rows(sums: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Per sub-space, the cell sums whose count reads as one vector: ``|count - 1| <
    ONE_TOL``, and ``|count + 1| < ONE_TOL`` negated (in a difference, one vector that
    left the cell). With exact counts, each such row is one raw (encoded) sub-vector."""
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    return [np.concatenate([s[j][np.abs(c[j] - 1) < ONE_TOL], -s[j][np.abs(c[j] + 1) < ONE_TOL]]) for j in range(c.shape[0])]


Candidates = list[tuple[tuple[str, ...], list[np.ndarray]]]  # (encoder spaces to test in, rows per sub-space)


def difference_candidates(observations: Sequence[Observation]) -> Candidates:
    """The differencing attack: subtract two observations in one encoder space.

    - same request, one client set strictly inside the other: the difference is the
      statistics of the clients only the larger set holds (the sum over {A, B, C}
      minus the sum over {A, B} is C's own);
    - same client set, other codebooks (two rounds, or two sessions the server set up):
      a cell whose count moved by one gained or lost one vector, and the difference of
      its sums is that vector.

    Cells of a difference whose count reads as +-1 give candidate raw sub-vectors.
    """
    by_space: dict[str, list[Observation]] = {}
    for ob in observations:
        if len(ob.spaces) == 1:
            by_space.setdefault(ob.spaces[0], []).append(ob)
    out: Candidates = []
    for space, obs in by_space.items():
        for i, a in enumerate(obs):
            for b in obs[i + 1:]:
                if a.model == b.model:
                    if not (a.clients < b.clients or b.clients < a.clients):
                        continue
                elif a.clients != b.clients:
                    continue
                rows = count_one_rows(a.sums - b.sums, a.counts - b.counts)
                if any(r.size for r in rows):
                    out.append(((space,), rows))
    return out


def federation_candidates(observations: Sequence[Observation]) -> Candidates:
    """Federation-wide small cells: per request (send batch and model) the sum of what
    every client contributed (the plain replies added up; a decoded secure sum as it
    is). A cell whose total count reads as one holds one vector: its sum is that raw
    sub-vector, in the space of the one client whose count there is one."""
    groups: dict[tuple[int, str], list[Observation]] = {}
    for ob in observations:
        groups.setdefault((ob.batch, ob.model), []).append(ob)
    out: Candidates = []
    for obs in groups.values():
        sums = np.sum([ob.sums for ob in obs], axis=0)
        counts = np.sum([ob.counts for ob in obs], axis=0)
        one = np.abs(counts - 1) < ONE_TOL
        for ob in obs:
            mask = one & (np.abs(ob.counts - 1) < ONE_TOL)
            if mask.any():
                out.append((ob.spaces, [sums[j][mask[j]] for j in range(mask.shape[0])]))
    return out
