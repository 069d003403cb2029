"""A session's outbox: the answers waiting to be written to its client, bounded in count and bytes.

A client that keeps sending steps but never reads its answers must not make the peer compute
ahead and buffer them: a count bound alone lets 256 answers of up to a whole message each pile up
per session (and a client may hold many sessions). So the outbox is bounded in bytes as well, and
a step's answer waits for room (backpressure: the step's stream stops reading, so its sender is
held by gRPC's flow control) instead of being queued past the bound. That wait has the idle
deadline of a write: a client that takes nothing for that long is not reading, and its session is
closed (its pages freed) and its call ended.

Control items (an error, the end of the stream) are small and end the stream; they never wait, so
a reader can always say why it stops. They are still counted, so they cannot pile up either.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from brigade.protocol.errors import BrigadeError

logger = logging.getLogger(__name__)

OUTBOX_ITEMS = 256  # answers waiting for a client at most
OUTBOX_BYTES = 8 * 1024 * 1024  # and their bytes at most (one answer larger than this fits an empty outbox)
CONTROL_SLACK = 16  # control items (errors, EOF) allowed past OUTBOX_ITEMS before the session is closed


class OutboxStalledError(BrigadeError):
    """The client took no answer for the idle timeout while answers waited: it is not reading."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Outbox:
    """FIFO of answers for one client stream; ``put`` waits for room, ``post`` (control items) never does."""

    def __init__(self, max_items: int = OUTBOX_ITEMS, max_bytes: int = OUTBOX_BYTES):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()  # set when an item was added
        self._room = asyncio.Event()  # set when an item was taken (or the outbox closed)
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of the answers waiting now."""
        return self._bytes

    def _fits(self, nbytes: int) -> bool:
        if not self._items:
            return True  # one answer always fits: a message is bounded by the gRPC cap already
        return len(self._items) < self.max_items and self._bytes + nbytes <= self.max_bytes

    def _append(self, item: Any, nbytes: int) -> None:
        self._items.append((item, nbytes))
        self._bytes += nbytes
        self._ready.set()

    async def put(self, item: Any, nbytes: int, timeout_s: float) -> None:
        """Queues an answer of ``nbytes``, waiting up to ``timeout_s`` for the client to take enough.

        Raises OutboxStalledError when the wait passes its deadline. A closed outbox (the session
        ended) takes the answer without waiting if it fits, else drops it (the session's next step fails)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.closed and not self._fits(nbytes):
            self._room.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OutboxStalledError(
                    f"the client took no answer for {timeout_s:g} s while {len(self._items)} waited "
                    f"({self._bytes} bytes); the session was closed")
            try:
                async with asyncio.timeout(remaining):
                    await self._room.wait()
            except TimeoutError:
                continue  # the loop raises (or finds room that came at the last moment)
        if not self.closed or self._fits(nbytes):
            self._append(item, nbytes)  # a closed outbox still takes what fits: the writer sends it before
            # the call ends (a draining peer's last answers say it is leaving, so its client migrates)

    def post(self, item: Any) -> bool:
        """Queues a control item at once; False when even the slack is used up (the client is not reading)."""
        if len(self._items) >= self.max_items + CONTROL_SLACK:
            return False
        self._append(item, 0)
        return True

    async def get(self) -> Any:
        """The oldest item, waiting for one."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item, nbytes = self._items.popleft()
        self._bytes -= nbytes
        self._room.set()
        return item

    def close(self) -> None:
        """The session ended: no more answers are taken, and a waiting putter lets go.

        What is queued stays for the writer (an error that says why the stream ends may be among it);
        it is bounded, and goes with the call, which ends within a write deadline."""
        self.closed = True
        self._room.set()


def post(session: Any, item: object) -> None:
    """Queues a control item (an error, EOF) for a session's client stream. An outbox full even of
    those means the client stopped reading: the session is closed there and then (its pages freed)."""
    outbox: Outbox = session.outbox
    if outbox.post(item):
        return
    if not session.closed:
        logger.warning("session %s: its client stopped reading results; closing it", session.session_id)
    release: Callable[[], None] | None = session.release
    if release is not None:
        release()
    session.closed = True


async def send(session: Any, message: Any, timeout_s: float) -> None:
    """Queues an answer for a session's client, waiting up to ``timeout_s`` for room (backpressure).

    A client that took nothing for that long is not reading: its session is closed at once (pages
    freed, queued work dropped) and OutboxStalledError ends the step and, through the reader, the call."""
    try:
        await session.outbox.put(message, message.ByteSize(), timeout_s)
    except OutboxStalledError:
        logger.warning("session %s: its client stopped reading results; closing it", session.session_id)
        if session.release is not None:
            session.release()
        session.closed = True
        raise
