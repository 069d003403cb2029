"""How many requests generate at once, how many may wait, and for how long.

There is no lock around generation: every admitted request has its own sessions on the peers
and the model's loop interleaves their steps, so requests share the swarm token by token. What
is bounded is the number of requests generating at once (each holds cache memory on every peer
of its route), the number waiting for a turn (first come, first served), and how long one
waits; past either bound the request gets 503 with Retry-After, which SDKs retry with backoff.
"""

from __future__ import annotations

import asyncio

from brigade.client.api.errors import overloaded


class Lease:
    """One admitted request's turn; ``release`` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release()


class Admission:
    def __init__(self, max_active: int, max_queued: int, queue_timeout_s: float):
        if max_active < 1 or max_queued < 0 or queue_timeout_s <= 0:
            raise ValueError("max_active >= 1, max_queued >= 0 and queue_timeout_s > 0 are required")
        self.max_active = max_active  # requests generating at once
        self.max_queued = max_queued  # requests waiting for a turn
        self.queue_timeout_s = queue_timeout_s  # longest wait for a turn
        self.active = 0
        self._waiters: list[asyncio.Future[None]] = []  # FIFO: the oldest waiter gets the next turn

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def admit(self) -> Lease:
        """A turn now, or after a wait in line; 503 when the line is full or the wait too long."""
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return Lease(self)
        if len(self._waiters) >= self.max_queued:
            raise overloaded(f"the server is busy: {self.active} requests running and {len(self._waiters)} "
                             "waiting; try again later")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter  # _release hands its turn over: ``active`` already counts this request
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the turn arrived just as this request gave up: pass it on
            if isinstance(error, TimeoutError):
                raise overloaded(f"no turn within {self.queue_timeout_s:.0f} s: the server is busy; "
                                 "try again later") from None
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return Lease(self)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)  # the turn moves to the waiter; ``active`` is unchanged
                return
        self.active -= 1
