"""Per-peer exponential backoff: a peer that failed is avoided for a while, longer each time.

A ban expires on its own, so a peer that restarts (same identity, same id) is used again; one
success forgives its record of failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    failures: int
    until: float


class PeerBans:
    def __init__(self, base_s: float = 2.0, max_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def ban(self, peer_id: str) -> float:
        """Bans ``peer_id`` for base * 2^(failures - 1) seconds (at most max_s); returns the duration."""
        entry = self._entries.get(peer_id)
        failures = entry.failures + 1 if entry else 1
        duration = min(self.max_s, self.base_s * 2 ** (failures - 1))
        self._entries[peer_id] = _Entry(failures, self._clock() + duration)
        return duration

    def forgive(self, peer_id: str) -> None:
        self._entries.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        entry = self._entries.get(peer_id)
        return entry is not None and entry.until > self._clock()

    def banned(self) -> set[str]:
        now = self._clock()
        return {peer_id for peer_id, entry in self._entries.items() if entry.until > now}
