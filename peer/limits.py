"""What one client may have a peer do at once, and the errors of work that ran out of time or room.

The compute queue and the unary RPCs are bounded per client so that one identity cannot fill the
peer's compute thread with work (``Forward`` passes, ``History`` reads) while others wait; past a
bound the request is refused at once with RESOURCE_EXHAUSTED, which a client takes as "route
around this peer", never as its own fault.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from brigade.protocol.errors import BrigadeError, QuotaExceededError


class StepDeadlineError(BrigadeError):
    """A step or pass did not finish within the peer's step deadline: this peer is too slow (or
    too loaded) for it; the client routes around it. The call ends, its work is dropped."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ComputeBusyError(QuotaExceededError):
    """The compute queue (overall or the client's part of it) is full: retry later or elsewhere."""


class ClientSlots:
    """In-flight calls of one kind (``Forward``, ``History``) per client: at most ``per_client`` each.

    Counted on the event loop, but a lock keeps it safe from any thread.
    """

    def __init__(self, kind: str, per_client: int):
        if per_client < 1:
            raise ValueError(f"{kind} calls per client must be at least 1, got {per_client}")
        self.kind = kind
        self.per_client = per_client
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One slot of ``client``'s for the body; ``ComputeBusyError`` when it holds them all."""
        with self._lock:
            held = self._held.get(client, 0)
            if held >= self.per_client:
                raise ComputeBusyError(
                    f"client {client[:64] or '(anonymous)'} already has {held} {self.kind} calls running here, "
                    f"its limit; wait for them or use other peers")
            self._held[client] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held[client] - 1
                if left:
                    self._held[client] = left
                else:
                    del self._held[client]

    def held(self, client: str) -> int:
        with self._lock:
            return self._held.get(client, 0)
