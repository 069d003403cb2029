"""What a relay lets anyone use: the volunteer's caps, byte budgets, and counts per source address.

A relay is a public service of a volunteer's machine, so every resource it hands out has a bound
that one party cannot spend for everyone: registrations and client connections per source IP
(one host opening many connections or registering many fresh identities takes its own share,
not the relay's), connections idle too long are closed, and bytes are budgeted per relayed peer.
Kept apart from ``peer/relay.py`` so the service reads as the protocol and this as the policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RelayLimits:
    """What a volunteer lets its relay carry."""

    max_peers: int = 16  # relayed peers registered at once
    max_peers_per_source: int = 4  # ... registered from one source IP (fresh identities cost nothing)
    max_connections: int = 128  # client connections carried at once, all relayed peers together
    max_connections_per_peer: int = 32  # ... and for one relayed peer
    max_connections_per_source: int = 16  # ... and from one client source IP
    max_bytes_per_hour: int = 4 << 30  # bytes forwarded (both directions) per relayed peer per clock hour; 0 = no cap
    idle_timeout_s: float = 300.0  # a carried connection with no byte either way this long is closed
    preamble_timeout_s: float = 5.0  # a client must send its CONNECT within this
    splice_timeout_s: float = 5.0  # the relayed peer must open the connection's Splice within this
    register_timeout_s: float = 10.0  # a Tunnel stream must register within this
    notice_timeout_s: float = 10.0  # a relayed peer must take each notice on its tunnel within this


class ByteBudget:
    """Bytes one relayed peer may still use in the current hour (a fixed window: simple to explain)."""

    def __init__(self, per_hour: int, clock: Callable[[], float]):
        self.per_hour = per_hour
        self._clock = clock
        self._window = -1
        self.used = 0

    def charge(self, count: int) -> bool:
        """Counts ``count`` bytes; False once the hour's budget is spent (the connection must stop)."""
        if self.per_hour <= 0:
            return True
        window = int(self._clock() // 3600)
        if window != self._window:
            self._window, self.used = window, 0
        self.used += count
        return self.used <= self.per_hour

    def exhausted(self) -> bool:
        return self.per_hour > 0 and int(self._clock() // 3600) == self._window and self.used >= self.per_hour


class SourceCounts:
    """How many of something each source address holds, against one cap."""

    def __init__(self, cap: int):
        self.cap = cap
        self._held: Counter[str] = Counter()

    def take(self, source: str) -> bool:
        """One more for ``source``; False (and nothing taken) when it holds its cap already."""
        if self._held[source] >= self.cap:
            return False
        self._held[source] += 1
        return True

    def give_back(self, source: str) -> None:
        self._held[source] -= 1
        if self._held[source] <= 0:
            del self._held[source]

    def held(self, source: str) -> int:
        return self._held.get(source, 0)
