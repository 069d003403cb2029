"""What the client knows about peers, in one place: bans, leaving, distrusted, and the evidence.

(Which pairs of peers could not reach each other is a session's own knowledge: the path of one
session's pair says little about another's, and a killed receiver that restarts is reachable again.)

Every session of a model, its result checks and its stateless passes consult and update this one
object. A check that catches a peer records its verdict here (``distrust``) instead of writing
into the session it checked; the session's step loop asks ``excluded()`` when it routes, so a
caught peer leaves every session of the model at its next step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from brigade.client.bans import PeerBans

MAX_REPORTS_KEPT = 256  # verdicts kept as evidence (each holds a few attestations)
MAX_REMEMBERED = 4096  # entries a timed set keeps (the oldest go first)
# A peer that said it is leaving is avoided this long; by then its record says so itself (routing skips
# leaving records), and a peer that restarted since (same id) is usable again at once after it.
LEAVING_MEMORY_S = 10.0

K = TypeVar("K", bound=Hashable)


class TimedSet(Generic[K]):
    """Members that expire: what the client learnt about a peer holds only until the peer may have changed
    (a drained peer restarts, a pair's network path heals)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self._clock = ttl_s, clock
        self._until: dict[K, float] = {}

    def add(self, member: K) -> None:
        if len(self._until) >= MAX_REMEMBERED:
            self._until.pop(next(iter(self._until)))
        self._until.pop(member, None)
        self._until[member] = self._clock() + self.ttl_s

    def __contains__(self, member: object) -> bool:
        until = self._until.get(member)  # type: ignore[call-overload]
        return until is not None and until > self._clock()

    def members(self) -> set[K]:
        now = self._clock()
        return {member for member, until in self._until.items() if until > now}


class PeerStanding:
    """Bans with backoff (failures), leaving (no fault), distrusted (caught by a result check)."""

    def __init__(self, bans: PeerBans):
        self.bans = bans
        self.leaving: TimedSet[str] = TimedSet(LEAVING_MEMORY_S)  # said they are draining: avoided, never banned
        self.distrusted: set[str] = set()  # peers a result check caught returning wrong results: never used again
        self.reports: deque[Any] = deque(maxlen=MAX_REPORTS_KEPT)  # client/verify's VerificationReport, newest last

    def excluded(self) -> set[str]:
        """Peers no route may use now."""
        return self.bans.banned() | self.leaving.members() | self.distrusted

    def ban(self, peer_id: str) -> float:
        return self.bans.ban(peer_id)

    def forgive(self, peer_id: str) -> None:
        self.bans.forgive(peer_id)

    def mark_leaving(self, peer_id: str) -> None:
        self.leaving.add(peer_id)

    def distrust(self, report: Any) -> None:
        """A check's verdict: every accused peer is dropped from every session, the report kept as evidence."""
        self.distrusted.update(report.accused)
        self.reports.append(report)
