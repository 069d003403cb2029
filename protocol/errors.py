"""Typed errors for remote input, each mapped to the gRPC status a peer answers with.

Peers raise these for anything a client sent wrong; the servicer turns them into a status with
a readable message and keeps serving. Clients see the same classes again via ``from_status``.
"""

from __future__ import annotations

import grpc


class BrigadeError(Exception):
    """Base of every error that crosses the wire with a status code."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidTensorError(BrigadeError):
    """A tensor's dtype, shape, byte count or values are not acceptable."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class InvalidRequestError(BrigadeError):
    """A request is malformed: missing fields, layers outside the span, bad session id."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class UnknownSessionError(BrigadeError):
    """A step names a session that this peer does not hold (expired, closed, or never opened)."""

    status = grpc.StatusCode.NOT_FOUND


class SessionLengthError(BrigadeError):
    """A step would take a session past the max_length it was opened with."""

    status = grpc.StatusCode.OUT_OF_RANGE


class CacheFullError(BrigadeError):
    """The peer's KV cache pool cannot give the session the memory it needs."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class PeerLeavingError(BrigadeError):
    """The peer is draining before shutdown and accepts no new sessions.

    FAILED_PRECONDITION rather than UNAVAILABLE, which a dead connection also gives: a leaving
    peer did nothing wrong and must not be banned.
    """

    status = grpc.StatusCode.FAILED_PRECONDITION


class InvalidTokenError(BrigadeError):
    """A request's identity token is missing, malformed, expired, replayed or for another peer."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(BrigadeError):
    """The identity is valid but not allowed here (block list, not the session's owner or upstream)."""

    status = grpc.StatusCode.PERMISSION_DENIED


class QuotaExceededError(CacheFullError):
    """One client identity asks for more sessions or cache than its share of this peer."""


class MissingLayersError(Exception):
    """No live peer serves some layers of the model; raised on the client side."""

    def __init__(self, model_name: str, missing: list[tuple[int, int]]):
        self.model_name = model_name
        self.missing = missing
        spans = ", ".join(f"{start}:{end}" for start, end in missing)
        super().__init__(f"no live peer of model {model_name!r} serves layers {spans}")


_BY_STATUS = {
    cls.status: cls
    for cls in (InvalidRequestError, UnknownSessionError, SessionLengthError, CacheFullError, PeerLeavingError,
                InvalidTokenError, PermissionDeniedError)
}


def from_status(code: grpc.StatusCode, details: str) -> BrigadeError:
    """The typed error that a peer's status stands for (INVALID_ARGUMENT maps to InvalidRequestError)."""
    cls = _BY_STATUS.get(code, BrigadeError)
    return cls(details)
