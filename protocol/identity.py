"""Peer and client identity: an Ed25519 key kept in a 0600 file, and the id derived from it.

Every record a peer stores in the DHT is signed with this key, so an id cannot be claimed by
anyone who does not hold it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import base58
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PEER_ID_PREFIX = "bp"
MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is 119 bytes; never read a huge file whole
# Public keys whose peer id and parsed form are remembered. Every attestation a client checks on
# arrival (and every push, token and record a peer checks) comes from one of a few keys: deriving the
# id (SHA-256, then base58 in pure Python) and parsing the key each time was a third of a check.
KEY_CACHE_SIZE = 4096


def peer_id_of(public_key: bytes) -> str:
    """A short printable id: the first 16 bytes of the key's SHA-256 in base58."""
    if type(public_key) is bytes:  # exactly bytes are remembered; other bytes-likes behave as they always did
        return _remembered_peer_id(public_key)
    return _derive_peer_id(public_key)


def _derive_peer_id(public_key: bytes) -> str:
    return PEER_ID_PREFIX + base58.b58encode(hashlib.sha256(public_key).digest()[:16]).decode()


def _public_key(public_key: bytes) -> Ed25519PublicKey:
    """The parsed key; bytes that are not one raise ValueError (never remembered: refused every time)."""
    if type(public_key) is bytes:
        return _remembered_key(public_key)
    return Ed25519PublicKey.from_public_bytes(public_key)


_remembered_peer_id = functools.lru_cache(maxsize=KEY_CACHE_SIZE)(_derive_peer_id)
_remembered_key = functools.lru_cache(maxsize=KEY_CACHE_SIZE)(Ed25519PublicKey.from_public_bytes)


class Identity:
    """An Ed25519 key pair with its derived peer id."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Reads the key at ``path``; creates it (mode 0600) on first run so restarts keep the id.

        Raises ValueError, naming the file, when it holds anything but an unencrypted PEM Ed25519
        key (OSError when it cannot be read at all).
        """
        path = Path(path)
        if path.exists():
            with open(path, "rb") as file:
                pem = file.read(MAX_KEY_FILE_BYTES + 1)
            if len(pem) > MAX_KEY_FILE_BYTES:
                raise ValueError(f"{path} is over {MAX_KEY_FILE_BYTES} bytes: not a key file")
            try:
                key = serialization.load_pem_private_key(pem, password=None)
            # Junk, an encrypted key, an unknown kind of key, or one OpenSSL cannot set up (an X448
            # header on 32 bytes of key raises InternalError: found by tests/fuzz/atheris_decoders.py).
            except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as e:
                raise ValueError(f"{path} does not hold an unencrypted PEM private key: {e}") from e
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``message``; never raises."""
    try:
        _public_key(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
