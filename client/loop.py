"""A private event loop on a daemon thread: the async core behind the library's sync methods.

Users call ``generate`` from plain code; the gRPC streams and DHT reads all live on this loop,
and each sync call waits on one future. Closing the loop cancels what still runs on it and wakes
every caller still waiting (``ClientClosedError``), so no thread waits on a loop that has stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

POLL_S = 0.5  # how often a waiting caller looks whether the loop was closed under it
CANCEL_WAIT_S = 3.0  # how long close() lets cancelled work finish its clean-up


class ClientClosedError(RuntimeError):
    """The client was closed while this call waited on it."""


class LoopThread:
    def __init__(self, name: str = "brigade-client") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._closing = False
        self._stopped = False
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Runs ``coroutine`` on the loop and waits for it (cancelling it when the wait times out)."""
        if self._closing:
            coroutine.close()
            raise ClientClosedError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                left = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
                try:
                    return future.result(left)
                except concurrent.futures.CancelledError:
                    if self._closing:  # close() cancelled it
                        raise ClientClosedError("the client was closed while this call waited") from None
                    raise
                except TimeoutError:
                    if future.done():  # the work's own TimeoutError, or it finished just after the poll
                        return future.result()
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    if self._stopped:  # the loop stopped (or would not answer close()) under this call
                        raise ClientClosedError("the client was closed while this call waited") from None
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Cancels what still runs on the loop (bounded), then stops it."""
        if self._loop.is_closed():
            return
        self._closing = True
        if self._thread.is_alive() and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(CANCEL_WAIT_S + 1.0)
            except Exception:  # a loop that does not answer (blocked): stopped below all the same
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._stopped = True
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_all() -> None:
    """Cancels every other task on this loop and waits (bounded) for them to finish their clean-up."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
