"""One error taxonomy for the swarm, each error mapped to the gRPC status a peer answers with.

Two kinds of fault. **The request's own** (``request_fault``): the client's input is wrong, so every
peer would refuse it (a malformed tensor, a layer range, a length past the session). **The peer's**:
it failed to compute, is overloaded or leaving, refused by its own policy, or answered wrongly.

A peer raises these and the servicer turns them into a status with a readable message; a client
sees them again via ``from_status``. A client never ends a user's work on a peer's word alone: it
checks its own requests itself before sending (a wrong one is the caller's ``ValueError``), so any
refusal or failure a peer answers with, whatever its status, bans that peer and re-routes
(``client/hops.py``). ``BadAnswerError`` is what the client's own checks of an answer raise.
"""

from __future__ import annotations

import grpc


class BrigadeError(Exception):
    """Base of every error that crosses the wire with a status code."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    request_fault: bool = False  # True: the request itself is wrong, every peer would refuse it


class ComputeError(BrigadeError):
    """The peer failed to compute a step or pass (out of memory, a span being moved, a bug): its fault."""

    status = grpc.StatusCode.INTERNAL


class BadAnswerError(BrigadeError):
    """A peer's answer is not what was asked (positions, shape, dtype, lengths): raised by the client's checks."""

    status = grpc.StatusCode.DATA_LOSS


class InvalidTensorError(BrigadeError):
    """A tensor's dtype, shape, byte count or values are not acceptable."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    request_fault = True


class InvalidRequestError(BrigadeError):
    """A request is malformed: missing fields, layers outside the span, bad session id."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    request_fault = True


class UnknownSessionError(BrigadeError):
    """A step names a session that this peer does not hold (expired, closed, or never opened)."""

    status = grpc.StatusCode.NOT_FOUND


class SessionLengthError(BrigadeError):
    """A step would take a session past the max_length it was opened with (or past what this peer allows)."""

    status = grpc.StatusCode.OUT_OF_RANGE
    request_fault = True


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

    def __init__(self, model_name: str, missing: list[tuple[int, int]], hint: str = ""):
        self.model_name = model_name
        self.missing = missing
        spans = ", ".join(f"{start}:{end}" for start, end in missing)
        super().__init__(f"no live peer of model {model_name!r} serves layers {spans}{hint}")


_BY_STATUS = {
    cls.status: cls
    for cls in (InvalidRequestError, UnknownSessionError, SessionLengthError, CacheFullError, PeerLeavingError,
                InvalidTokenError, PermissionDeniedError, ComputeError, BadAnswerError)
}


def from_status(code: grpc.StatusCode, details: str) -> BrigadeError:
    """The typed error that a peer's status stands for (INVALID_ARGUMENT maps to InvalidRequestError)."""
    cls = _BY_STATUS.get(code, BrigadeError)
    return cls(details)
