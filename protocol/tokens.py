"""Short-lived signed tokens: who is asking, for which peer, for what.

A peer counts sessions and cache per client identity, lets a previous hop push steps into a
session only if the client named it, and serves a session's kept outputs only to the client that
opened it. Each of these needs proof of an identity, so requests carry a ``Token``: the signer's
Ed25519 public key and a signature over the receiving peer's id (so a token cannot be replayed at
another peer), a timestamp (so an old one is refused), a random nonce (so one cannot be replayed at
the same peer) and a digest of what it authorises (so it cannot be moved to another request).

Identities are free to make, so this does not stop one person with many keys; it stops one key
from taking a peer over, and it makes every hop's signed work attributable.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import InvalidTokenError
from brigade.protocol.identity import Identity, peer_id_of, verify

TOKEN_MAX_AGE_S = 300.0  # a token issued longer ago than this is refused
TOKEN_MAX_SKEW_S = 60.0  # ... and so is one issued this far in the future (clocks differ a little)
NONCE_BYTES = 16
_DOMAIN = b"brigade-token/1"


def _signed_bytes(audience: str, issued_at: float, nonce: bytes, purpose: str, binding: bytes) -> bytes:
    digest = hashlib.sha256(binding).digest()
    return b"\0".join(
        [_DOMAIN, audience.encode(), struct.pack("!d", issued_at), nonce, purpose.encode(), digest]
    )


def make_token(identity: Identity, audience: str, purpose: str, binding: bytes = b"",
               now: float | None = None) -> pb.Token:
    """A token for ``audience`` (a peer id) authorising ``purpose`` on ``binding`` (e.g. a session id)."""
    issued_at = time.time() if now is None else now
    nonce = os.urandom(NONCE_BYTES)
    signature = identity.sign(_signed_bytes(audience, issued_at, nonce, purpose, binding))
    return pb.Token(public_key=identity.public_key, audience=audience, issued_at=issued_at, nonce=nonce,
                    signature=signature)


class TokenVerifier:
    """Checks tokens addressed to one peer; remembers recent nonces to refuse replays.

    The nonce memory is bounded: entries older than the token lifetime are dropped, and past
    ``max_nonces`` the oldest go first (a flood of fresh tokens can only push out entries that
    are about to expire anyway at any rate below ``max_nonces / max_age_s`` per second).
    """

    def __init__(self, peer_id: str, *, max_age_s: float = TOKEN_MAX_AGE_S, max_nonces: int = 200_000,
                 clock: Callable[[], float] = time.time):
        self.peer_id = peer_id
        self.max_age_s = max_age_s
        self.max_nonces = max_nonces
        self._clock = clock
        self._nonces: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, token: pb.Token | None, purpose: str, binding: bytes = b"") -> str:
        """The signer's peer id if ``token`` is valid for ``purpose`` on ``binding``; else InvalidTokenError."""
        if token is None or not token.public_key:
            raise InvalidTokenError(f"a {purpose} request needs a token signed by the client's identity")
        if len(token.public_key) != 32 or len(token.nonce) != NONCE_BYTES or len(token.signature) != 64:
            raise InvalidTokenError("malformed token: wrong key, nonce or signature length")
        if token.audience != self.peer_id:
            raise InvalidTokenError(f"token is addressed to {token.audience[:64]!r}, not to this peer")
        now = self._clock()
        if not (now - self.max_age_s <= token.issued_at <= now + TOKEN_MAX_SKEW_S):
            raise InvalidTokenError("token expired or issued in the future; check the client's clock")
        message = _signed_bytes(token.audience, token.issued_at, token.nonce, purpose, binding)
        if not verify(token.public_key, token.signature, message):
            raise InvalidTokenError(f"token signature does not verify for this {purpose} request")
        with self._lock:
            self._forget_old(now)
            if token.nonce in self._nonces:
                raise InvalidTokenError("token was already used (replay)")
            self._nonces[token.nonce] = now
            while len(self._nonces) > self.max_nonces:
                self._nonces.popitem(last=False)
        return peer_id_of(token.public_key)

    def _forget_old(self, now: float) -> None:
        horizon = now - self.max_age_s - TOKEN_MAX_SKEW_S
        while self._nonces:
            nonce, seen_at = next(iter(self._nonces.items()))
            if seen_at >= horizon:
                break
            del self._nonces[nonce]
