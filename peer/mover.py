"""Moving a running peer to another span: drain, reload, announce.

The order is chosen so that no client loses work and no layer goes uncovered:

1. stop taking sessions and announce "leaving": clients route new sessions elsewhere, and open
   ones see ``peer_leaving`` on their next step and migrate (replaying their inputs elsewhere,
   exactly as when a peer shuts down). The rebalancing rule only moves a peer away from layers
   that other peers also serve, so they have somewhere to go;
2. wait until the sessions are gone, at least ``min_leaving_s`` (clients re-read the DHT every
   couple of seconds) and at most ``drain_s``; sessions still open then are closed: their next
   step is refused as "peer leaving", and the client migrates them the same way;
3. free the old span, then load the new one. Freeing first keeps the peak at one span's weights,
   which is what the peer's memory plan allows; if the new span fails to load, the old one is
   loaded back;
4. swap it in on the compute thread (after any step still queued there), then announce
   "online" with the new span.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from brigade.protocol.errors import PeerLeavingError

logger = logging.getLogger(__name__)


class Unloaded:
    """Stands in for the span while the peer reloads: any compute is refused as "peer leaving"."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise PeerLeavingError("this peer is moving to other layers; route around it")

    forward_segments = __call__


class SpanMover:
    """Moves the peer's span; ``move`` is what the rebalancer calls."""

    def __init__(
        self,
        sessions: Any,
        announce_state: Callable[[str], Awaitable[bool]],
        span: Callable[[], tuple[int, int]],
        load: Callable[[int, int], Awaitable[Any]],
        unload: Callable[[], Awaitable[None]],
        install: Callable[[Any, int, int], Awaitable[None]],
        *,
        drain_s: float = 30.0,
        min_leaving_s: float = 3.0,
    ):
        """``sessions``: the SessionManager (``accepting``, ``sessions``, ``close``);
        ``announce_state(state)`` stores a record now; ``load(start, end)`` returns a loaded span;
        ``unload()`` drops the current one; ``install(span, start, end)`` puts one in service."""
        self._sessions = sessions
        self._announce_state = announce_state
        self._span = span
        self._load = load
        self._unload = unload
        self._install = install
        self.drain_s = drain_s
        self.min_leaving_s = min_leaving_s
        self._lock = asyncio.Lock()

    async def move(self, start: int, end: int) -> bool:
        """Moves to layers ``[start, end)``; True when the peer serves them now.

        On a load failure the peer serves its old span again and returns False; if even that
        fails the error propagates (the peer cannot serve anything and should exit).
        """
        async with self._lock:
            old = self._span()
            if old == (start, end):
                return False
            loop = asyncio.get_running_loop()
            began = loop.time()
            self._sessions.accepting = False
            await self._announce_state("leaving")
            deadline = began + self.drain_s
            earliest = began + self.min_leaving_s
            while loop.time() < deadline and (self._sessions.sessions or loop.time() < earliest):
                await asyncio.sleep(0.1)
            remaining = list(self._sessions.sessions)
            for session_id in remaining:
                self._sessions.close(session_id)
            if remaining:
                logger.info("closed %d sessions still open after %.0f s; their clients will migrate",
                            len(remaining), self.drain_s)
            await self._unload()
            try:
                span = await self._load(start, end)
            except Exception:
                logger.exception("loading layers %d:%d failed; going back to %d:%d", start, end, *old)
                await self._install(await self._load(*old), *old)
                self._sessions.accepting = True
                await self._announce_state("online")
                return False
            await self._install(span, start, end)
            self._sessions.accepting = True
            await self._announce_state("online")
            logger.info("moved from layers %d:%d to %d:%d in %.1f s", *old, start, end, loop.time() - began)
            return True
