"""The cryptography of one secure-aggregation session.

- Key agreement: X25519, each shared secret through HKDF-SHA256 with the session id as
  salt and a purpose label, so the mask seed and the share-encryption key of a pair
  differ, and nothing carries over between sessions.
- Mask PRG: ChaCha20 keyed with a full 256-bit seed. (Flower's ``pseudo_rand_gen``
  folds its seed to 32 bits, flwr issue #7522: a server could brute-force every mask.)
- Share encryption: Fernet (AES-CBC + HMAC) from ``flwr.common.secure_aggregation``.
- Secret sharing: :mod:`fed_app.secagg.shamir` (why not Flower's: see there).
"""

from __future__ import annotations

import base64
import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto import symmetric_encryption

SEED_BYTES = 32
MASK_LABEL = b"fedvec secagg pairwise mask"
ENCRYPTION_LABEL = b"fedvec secagg share encryption"
RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


def new_secret() -> bytes:
    """A fresh X25519 private key (raw 32 bytes) or self-mask seed, from the OS."""
    return os.urandom(SEED_BYTES)


def public_key(secret: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(**RAW)


def agree(secret: bytes, peer_public: bytes, session: str, label: bytes) -> bytes:
    """32 bytes both ends of a pair derive alike, bound to the session and a purpose."""
    shared = X25519PrivateKey.from_private_bytes(secret).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=session.encode(), info=label).derive(shared)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint64 values: the ChaCha20 keystream of the seed."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor().update(b"\0" * (8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def encrypt(key: bytes, plaintext: bytes) -> bytes:
    return symmetric_encryption.encrypt(base64.urlsafe_b64encode(key), plaintext)


def decrypt(key: bytes, ciphertext: bytes) -> bytes:
    return symmetric_encryption.decrypt(base64.urlsafe_b64encode(key), ciphertext)

