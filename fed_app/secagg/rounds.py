"""Secure aggregation through a Flower Grid: the server's three extra stages after the
clients' setup replies (which carry their public keys), and the messages they use.

Every stage is a ``query.secagg`` message; a node that fails, refuses or times out at a
stage is dropped from the session (its contribution is lost, the round is not) until
fewer than the threshold remain, when the session aborts with the reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from . import fixed_point
from .server import Aborted, threshold_for, unmask_sum

MESSAGE_TYPE = "query.secagg"
SETUP = "secagg"  # the ConfigRecord in a train/evaluate message and in its reply
LAYOUT = "secagg-layout"  # names and shapes of the summed arrays, in the setup reply


def new_session() -> str:
    return uuid.uuid4().hex


def setup_record(session: str) -> ConfigRecord:
    return ConfigRecord({"stage": "setup", "session": session})


def layout_record(arrays: dict[str, np.ndarray]) -> ConfigRecord:
    names = sorted(arrays)
    return ConfigRecord({"names": names, "ndims": [arrays[k].ndim for k in names], "shape": [int(s) for k in names for s in arrays[k].shape]})


def read_layout(record: ConfigRecord) -> list[tuple[str, tuple[int, ...]]]:
    names, ndims, flat = list(record["names"]), [int(n) for n in record["ndims"]], [int(s) for s in record["shape"]]
    out, at = [], 0
    for name, nd in zip(names, ndims):
        out.append((str(name), tuple(flat[at: at + nd])))
        at += nd
    if at != len(flat):
        raise ValueError("secagg layout: shapes do not match the names")
    return out


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)]) if arrays else np.zeros(0)


def unflatten(vector: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = vector[at: at + size].reshape(shape)
        at += size
    return out


@dataclass
class SecureSum:
    """The decoded sum, or why there is none; who took part at each stage."""

    arrays: dict[str, np.ndarray] | None
    reason: str = ""
    joined: list[int] = field(default_factory=list)
    summed: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    threshold: int = 0
    bytes_up: dict[int, int] = field(default_factory=dict)


def _stage(grid: Grid, session: str, stage: str, payload: dict[int, RecordDict], timeout: float, out: SecureSum) -> dict[int, RecordDict]:
    msgs = []
    for node, content in payload.items():
        content["secagg"]["session"], content["secagg"]["stage"] = session, stage
        msgs.append(Message(content=content, message_type=MESSAGE_TYPE, dst_node_id=node))
    replies = {}
    received = grid.send_and_receive(msgs, timeout=timeout)
    # the SuperLink's own error replies (e.g. "Node Unavailable" for a node that stopped
    # sending heartbeats) come from node 1: attribute every reply by the message it answers
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
    for r in received:
        node = dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
        if r.has_error():
            out.dropped[node] = f"{stage}: {r.error.reason}"
        elif "refusal" in r.content.config_records:
            out.dropped[node] = f"{stage}: refused: {r.content['refusal']['reason']}"
        else:
            replies[node] = r.content
            out.bytes_up[node] = out.bytes_up.get(node, 0) + _nbytes(r.content)
    for node in payload:
        if node not in replies and node not in out.dropped:
            out.dropped[node] = f"{stage}: no reply within timeout_s={timeout:.0f}"
    return replies


def _nbytes(content: RecordDict) -> int:
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for v in rec.values():
            n += sum(len(b) for b in v) if isinstance(v, list) and v and isinstance(v[0], bytes) else (len(v) if isinstance(v, bytes) else 0)
    return n


def secure_sum(grid: Grid, session: str, setup_replies: list[Message], fraction: float, min_clients: int, timeout: float, label: str) -> SecureSum:
    """Run stages 2-4 with the nodes whose setup replies carry keys; decode the sum."""
    out = SecureSum(arrays=None)
    keys, layouts, bits = {}, {}, {}
    for r in setup_replies:
        if r.has_error() or SETUP not in r.content.config_records or LAYOUT not in r.content.config_records:
            continue
        rec = r.content[SETUP]
        node = r.metadata.src_node_id
        if str(rec.get("session", "")) != session:
            out.dropped[node] = "setup: answered another session"
            continue
        try:
            layouts[node] = tuple(read_layout(r.content[LAYOUT]))
            keys[node] = (bytes(rec["c-pk"]), bytes(rec["s-pk"]))
            bits[node] = int(rec["fixed-point-bits"])
        except (KeyError, ValueError, TypeError) as e:
            out.dropped[node] = f"setup: malformed reply ({e})"
        out.bytes_up[node] = _nbytes(r.content)
    if not keys:
        out.reason = f"{label}: no client answered the secure-aggregation setup"
        return out
    # the layout (and fixed point) most nodes agree on; a node sending another shape is dropped
    common = max(set(zip(layouts.values(), bits.values())), key=lambda lb: sum(1 for n in keys if (layouts[n], bits[n]) == lb))
    for n in list(keys):
        if (layouts[n], bits[n]) != common:
            out.dropped[n] = "setup: statistics of a different shape or fixed point than the other nodes"
            del keys[n]
    layout, frac_bits = list(common[0]), common[1]
    roster = sorted(keys)
    out.joined, out.threshold = roster, threshold_for(len(roster), fraction)
    t = out.threshold
    try:
        if len(roster) < min_clients:
            raise Aborted(f"{len(roster)} client(s) answered the setup, fewer than min_clients={min_clients}")
        c_pk, s_pk = [keys[n][0] for n in roster], [keys[n][1] for n in roster]
        roster_record = {"roster": [str(n) for n in roster], "c-pk": c_pk, "s-pk": s_pk, "threshold": t}
        shared = _stage(grid, session, "share", {n: RecordDict({"secagg": ConfigRecord(dict(roster_record))}) for n in roster}, timeout, out)
        cts: dict[int, dict[int, bytes]] = {}
        for node, content in shared.items():
            rec = content["secagg"]
            cts[node] = {int(d): bytes(c) for d, c in zip(rec["dst"], rec["ciphertexts"])}
        u2 = sorted(cts)
        if len(u2) < t:
            raise Aborted(f"only {len(u2)} of {len(roster)} client(s) shared their keys, below the threshold {t}")
        payload = {}
        for v in u2:
            senders = [u for u in u2 if u != v and v in cts[u]]
            payload[v] = RecordDict({"secagg": ConfigRecord({"senders": [str(u) for u in senders], "ciphertexts": [cts[u][v] for u in senders]})})
        masked_replies = _stage(grid, session, "mask", payload, timeout, out)
        length = sum(int(np.prod(s, dtype=np.int64)) for _, s in layout)
        masked = {}
        for node, content in masked_replies.items():
            y = content["masked"]["y"].numpy() if "masked" in content.array_records else None
            if y is None or y.dtype != np.uint64 or y.size != length:
                out.dropped[node] = "mask: the masked input has the wrong type or length"
                continue
            masked[node] = y
        if len(masked) < t:
            raise Aborted(f"only {len(masked)} of {len(roster)} client(s) sent a masked input, below the threshold {t}")
        survivors = sorted(masked)
        unmask_replies = _stage(grid, session, "unmask", {n: RecordDict({"secagg": ConfigRecord({"survivors": [str(u) for u in survivors]})}) for n in survivors}, timeout, out)
        revealed = {}
        for node, content in unmask_replies.items():
            rec = content["secagg"]
            revealed[node] = [(int(p), str(k), bytes(s)) for p, k, s in zip(rec["peers"], rec["kinds"], rec["shares"])]
        total = unmask_sum(session, roster, s_pk, t, masked, revealed, [v for v in u2 if v not in masked])
    except Aborted as e:
        out.reason = f"{label}: secure aggregation aborted: {e}"
        log(WARNING, "%s; dropped: %s", out.reason, out.dropped or "none")
        return out
    out.summed = survivors
    out.arrays = unflatten(fixed_point.decode(total, frac_bits), layout)
    log(INFO, "%s: secure sum of %d client(s) (threshold %d of %d)%s", label, len(survivors), t, len(roster),
        f"; dropped {sorted(out.dropped)}" if out.dropped else "")
    return out
