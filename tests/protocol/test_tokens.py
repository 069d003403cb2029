"""Request tokens: each is good once, for one peer, one purpose, one binding and a few minutes.

The peer-level checks (a missing, misaddressed, moved or replayed token answered UNAUTHENTICATED by a
real server) are in ``tests/peer/test_errors.py``; these pin down the verifier's rules with a clock
the test controls, including the ones a live test cannot reach (expiry, clock skew, the bounded
nonce memory).
"""

from __future__ import annotations

import pytest

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import InvalidTokenError
from brigade.protocol.identity import Identity
from brigade.protocol.tokens import TOKEN_MAX_AGE_S, TOKEN_MAX_SKEW_S, TokenVerifier, make_token

CLIENT = Identity.generate()
PEER = Identity.generate()
NOW = 1_000_000.0


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def verifier(clock: Clock | None = None, **kwargs: object) -> TokenVerifier:
    return TokenVerifier(PEER.peer_id, clock=clock or Clock(), **kwargs)  # type: ignore[arg-type]


def test_an_honest_token_names_its_signer() -> None:
    token = make_token(CLIENT, PEER.peer_id, "open", b"session-1", now=NOW)
    assert verifier().verify(token, "open", b"session-1") == CLIENT.peer_id


def test_a_replayed_token_is_refused_for_as_long_as_it_would_be_valid() -> None:
    clock = Clock()
    check = verifier(clock)
    token = make_token(CLIENT, PEER.peer_id, "forward", now=NOW)
    check.verify(token, "forward")
    for later in (0.0, 1.0, TOKEN_MAX_AGE_S - 1):
        clock.now = NOW + later
        with pytest.raises(InvalidTokenError, match="already used"):
            check.verify(token, "forward")
    clock.now = NOW + TOKEN_MAX_AGE_S + 1  # by now it is refused as expired, whether or not remembered
    with pytest.raises(InvalidTokenError, match="expired"):
        check.verify(token, "forward")


def test_a_copy_with_a_fresh_nonce_does_not_verify() -> None:
    token = make_token(CLIENT, PEER.peer_id, "forward", now=NOW)
    copy = pb.Token()
    copy.CopyFrom(token)
    copy.nonce = bytes(16)
    with pytest.raises(InvalidTokenError, match="does not verify"):
        verifier().verify(copy, "forward")


@pytest.mark.parametrize("issued_at", [NOW - TOKEN_MAX_AGE_S - 1, NOW + TOKEN_MAX_SKEW_S + 1])
def test_an_old_or_future_token_is_refused(issued_at: float) -> None:
    token = make_token(CLIENT, PEER.peer_id, "open", b"s", now=issued_at)
    with pytest.raises(InvalidTokenError, match="expired or issued in the future"):
        verifier().verify(token, "open", b"s")


def test_a_token_works_only_for_its_peer_purpose_and_binding() -> None:
    check = verifier()
    with pytest.raises(InvalidTokenError, match="addressed to"):
        check.verify(make_token(CLIENT, Identity.generate().peer_id, "open", b"s", now=NOW), "open", b"s")
    with pytest.raises(InvalidTokenError, match="does not verify"):
        check.verify(make_token(CLIENT, PEER.peer_id, "forward", b"s", now=NOW), "open", b"s")
    with pytest.raises(InvalidTokenError, match="does not verify"):
        check.verify(make_token(CLIENT, PEER.peer_id, "history", b"session-a", now=NOW), "history", b"session-b")


def test_a_token_claiming_another_key_does_not_verify() -> None:
    token = make_token(CLIENT, PEER.peer_id, "open", b"s", now=NOW)
    token.public_key = Identity.generate().public_key  # the signature is still the client's
    with pytest.raises(InvalidTokenError, match="does not verify"):
        verifier().verify(token, "open", b"s")


@pytest.mark.parametrize("field, value", [("public_key", b"x" * 31), ("nonce", b"x" * 15), ("signature", b"x" * 65)])
def test_malformed_tokens_are_refused_before_any_crypto(field: str, value: bytes) -> None:
    token = make_token(CLIENT, PEER.peer_id, "open", b"s", now=NOW)
    setattr(token, field, value)
    with pytest.raises(InvalidTokenError, match="malformed"):
        verifier().verify(token, "open", b"s")


def test_missing_token() -> None:
    for token in (None, pb.Token()):
        with pytest.raises(InvalidTokenError, match="needs a token"):
            verifier().verify(token, "open", b"s")


def test_the_nonce_memory_is_bounded_and_forgets_expired_tokens() -> None:
    clock = Clock()
    check = verifier(clock, max_nonces=100)
    for _ in range(250):
        check.verify(make_token(CLIENT, PEER.peer_id, "forward", now=NOW), "forward")
        assert len(check._nonces) <= 100
    recent = make_token(CLIENT, PEER.peer_id, "forward", now=NOW)
    check.verify(recent, "forward")
    with pytest.raises(InvalidTokenError, match="already used"):  # the newest are the ones kept
        check.verify(recent, "forward")
    clock.now = NOW + TOKEN_MAX_AGE_S + TOKEN_MAX_SKEW_S + 1
    check.verify(make_token(CLIENT, PEER.peer_id, "forward", now=clock.now), "forward")
    assert len(check._nonces) == 1  # everything older than a token's lifetime was dropped
