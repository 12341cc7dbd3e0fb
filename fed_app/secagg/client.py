"""The client side of secure aggregation: four stages, each checked against the
client's own limits (never against a value the server chose for them).

1. ``start``: fresh X25519 key pairs for this session (c: share encryption, s: masks).
2. ``share_keys``: given the roster of public keys and the threshold t, Shamir-share
   the self-mask seed b and the mask key s among the roster, encrypted pairwise.
3. ``mask``: y = x + PRG(b) + sum_v +-PRG(s_uv) over the peers whose shares arrived.
4. ``unmask``: for each survivor its share of b, for each peer that dropped after
   sharing its share of s; never both for one peer, and only once per session.

A server that equivocates can make the sum wrong, not learn an input: it would need t
shares of both secrets of one client, and honest clients never hand out both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import keys, shamir

NODE_BYTES = 8


class ProtocolError(ValueError):
    """A stage this client will not run as asked; the reason names the check."""


@dataclass(frozen=True)
class Limits:
    """The client's own conditions for taking part (from its privacy policy)."""

    min_clients: int  # smallest roster it masks its input in
    threshold: float  # smallest fraction of the roster needed to unmask, > 1/2


@dataclass
class Session:
    """What a client keeps between the stages (in Flower's Context.state)."""

    session: str
    node: int
    c_secret: bytes
    s_secret: bytes
    stage: str = "keys"
    roster: list[int] = field(default_factory=list)
    c_public: list[bytes] = field(default_factory=list)
    s_public: list[bytes] = field(default_factory=list)
    threshold: int = 0
    b_seed: bytes = b""
    peers: list[int] = field(default_factory=list)  # sent us shares: our masks cover them
    held_b: dict[int, bytes] = field(default_factory=dict)
    held_s: dict[int, bytes] = field(default_factory=dict)

    def to_config(self) -> dict:
        out = {k: getattr(self, k) for k in ("session", "node", "c_secret", "s_secret", "stage", "roster", "c_public", "s_public", "threshold", "b_seed", "peers")}
        out["node"] = str(self.node)  # node ids are uint64; ConfigRecord ints are int64
        out["roster"] = [str(n) for n in self.roster]
        out["peers"] = [str(n) for n in self.peers]
        out["held_nodes"] = [str(n) for n in self.held_b]
        out["held_b"] = [self.held_b[n] for n in self.held_b]
        out["held_s"] = [self.held_s[n] for n in self.held_b]
        return out

    @classmethod
    def from_config(cls, c: dict) -> "Session":
        held = [int(n) for n in c.get("held_nodes", [])]
        return cls(
            session=str(c["session"]), node=int(c["node"]), c_secret=bytes(c["c_secret"]), s_secret=bytes(c["s_secret"]),
            stage=str(c["stage"]), roster=[int(n) for n in c.get("roster", [])],
            c_public=[bytes(b) for b in c.get("c_public", [])], s_public=[bytes(b) for b in c.get("s_public", [])],
            threshold=int(c.get("threshold", 0)), b_seed=bytes(c.get("b_seed", b"")), peers=[int(n) for n in c.get("peers", [])],
            held_b=dict(zip(held, [bytes(b) for b in c.get("held_b", [])])), held_s=dict(zip(held, [bytes(b) for b in c.get("held_s", [])])),
        )


def start(session: str, node: int) -> tuple[Session, dict[str, bytes]]:
    s = Session(session=session, node=node, c_secret=keys.new_secret(), s_secret=keys.new_secret())
    return s, {"c-pk": keys.public_key(s.c_secret), "s-pk": keys.public_key(s.s_secret)}


def _expect(s: Session, stage: str) -> None:
    if s.stage != stage:
        raise ProtocolError(f"secure aggregation: asked for a stage out of order (this session is at {s.stage!r}, expected {stage!r})")


def _plain(src: int, dst: int, b_share: bytes, s_share: bytes) -> bytes:
    return src.to_bytes(NODE_BYTES, "big") + dst.to_bytes(NODE_BYTES, "big") + b_share + s_share


def share_keys(s: Session, roster: list[int], c_public: list[bytes], s_public: list[bytes], threshold: int, limits: Limits) -> dict[int, bytes]:
    """Check the roster and threshold against this client's limits; encrypted shares per peer."""
    _expect(s, "keys")
    n = len(roster)
    if len(set(roster)) != n or len(c_public) != n or len(s_public) != n:
        raise ProtocolError("secure aggregation: the roster repeats a node or its key lists do not match it")
    if len(set(c_public)) != n or len(set(s_public)) != n:
        raise ProtocolError("secure aggregation: two roster entries share a public key")
    if s.node not in roster:
        raise ProtocolError("secure aggregation: this node is not on the roster it was sent")
    me = roster.index(s.node)
    if c_public[me] != keys.public_key(s.c_secret) or s_public[me] != keys.public_key(s.s_secret):
        raise ProtocolError("secure aggregation: the roster carries public keys for this node that are not its own")
    if n < limits.min_clients:
        raise ProtocolError(f"secure aggregation: a roster of {n} is below this node's secagg-min-clients={limits.min_clients}")
    least = max(math.ceil(limits.threshold * n), n // 2 + 1)
    if not least <= threshold <= n:
        raise ProtocolError(
            f"secure aggregation: threshold {threshold} of {n} is below this node's minimum {least} "
            f"(secagg-threshold={limits.threshold}, and always more than half)"
        )
    s.roster, s.c_public, s.s_public, s.threshold = list(roster), list(c_public), list(s_public), threshold
    s.b_seed = keys.new_secret()
    b_shares = shamir.split(s.b_seed, threshold, n)
    s_shares = shamir.split(s.s_secret, threshold, n)
    out = {}
    for i, peer in enumerate(roster):
        if peer == s.node:
            s.held_b[peer], s.held_s[peer] = b_shares[i], s_shares[i]
            continue
        key = keys.agree(s.c_secret, c_public[i], s.session, keys.ENCRYPTION_LABEL)
        out[peer] = keys.encrypt(key, _plain(s.node, peer, b_shares[i], s_shares[i]))
    s.stage = "shared"
    return out


def _sign(me: int, peer: int) -> int:
    return 1 if me < peer else -1


def mask(s: Session, senders: list[int], ciphertexts: list[bytes], x: np.ndarray) -> np.ndarray:
    """Decrypt the shares peers sent us and return our masked input (uint64)."""
    _expect(s, "shared")
    if len(set(senders)) != len(senders) or not set(senders) <= set(s.roster) - {s.node}:
        raise ProtocolError("secure aggregation: shares forwarded from nodes off the roster, or twice")
    if len(senders) + 1 < s.threshold:
        raise ProtocolError(f"secure aggregation: only {len(senders) + 1} of the roster shared keys, below the threshold {s.threshold}")
    size = shamir.SHARE_BYTES
    for peer, ct in zip(senders, ciphertexts):
        i = s.roster.index(peer)
        try:
            plain = keys.decrypt(keys.agree(s.c_secret, s.c_public[i], s.session, keys.ENCRYPTION_LABEL), ct)
        except Exception as e:  # a forged or corrupted ciphertext
            raise ProtocolError(f"secure aggregation: the shares from node {peer} do not decrypt ({type(e).__name__})") from None
        if len(plain) != 2 * NODE_BYTES + 2 * size or int.from_bytes(plain[:NODE_BYTES], "big") != peer or int.from_bytes(plain[NODE_BYTES:2 * NODE_BYTES], "big") != s.node:
            raise ProtocolError(f"secure aggregation: the shares from node {peer} are not addressed from it to this node")
        s.held_b[peer], s.held_s[peer] = plain[2 * NODE_BYTES: 2 * NODE_BYTES + size], plain[2 * NODE_BYTES + size:]
    s.peers = list(senders)
    y = np.asarray(x, dtype=np.uint64) + keys.prg(s.b_seed, x.size)
    for peer in senders:
        seed = keys.agree(s.s_secret, s.s_public[s.roster.index(peer)], s.session, keys.MASK_LABEL)
        if _sign(s.node, peer) > 0:
            y += keys.prg(seed, x.size)
        else:
            y -= keys.prg(seed, x.size)
    s.stage = "masked"
    return y


def unmask(s: Session, survivors: list[int]) -> list[tuple[int, str, bytes]]:
    """(peer, "b" | "s", share): b-shares of survivors, s-shares of the dropped."""
    _expect(s, "masked")
    joined = set(s.peers) | {s.node}
    if s.node not in survivors or not set(survivors) <= joined or len(set(survivors)) != len(survivors):
        raise ProtocolError("secure aggregation: the survivor list names nodes that never shared keys with this node, or omits it")
    if len(survivors) < s.threshold:
        raise ProtocolError(f"secure aggregation: {len(survivors)} survivors are below the threshold {s.threshold}: refusing to unmask")
    dropped = joined - set(survivors)
    s.stage = "done"
    return [(p, "b", s.held_b[p]) for p in sorted(survivors)] + [(p, "s", s.held_s[p]) for p in sorted(dropped)]
