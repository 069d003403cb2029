"""The compute thread: one per device, running passes over the span for whatever work is ready.

The event loop only decodes, checks and enqueues; this thread takes everything that is ready,
asks the scheduler what the next pass computes (``plan_batch``), runs it as one batched forward
(``Span.forward_segments``), and hands each chunk's output back through the item's callback.

A lone session pays nothing for batching: the thread blocks on its inbox and starts the moment a
step arrives. When other sessions were busy in the previous pass and have not sent their next
step yet, it waits for them (stopping as soon as they are all in), so sessions decoding in step
share passes instead of queueing behind each other. The wait adapts to load: a quarter of the last
pass's compute time, never more than ``batch_window_s``. A straggler that misses a pass costs a
whole extra pass (decode passes are memory-bound: one session costs nearly what sixteen do), so
waiting a fraction of a pass for it is cheap; a light pass waits next to nothing.

The queue is bounded, overall and per client (``submit`` refuses past either bound, at once), and
work nobody waits for any more (its call cancelled or past its deadline, its session closed) is
dropped before each pass instead of computed: a flood of abandoned prefills costs at most the pass
that was running when each one was abandoned.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from brigade.kernels.batch import Segment
from brigade.kernels.span import Span
from brigade.peer.limits import ComputeBusyError
from brigade.peer.scheduler import WorkItem, plan_batch

logger = logging.getLogger(__name__)

_STOP = object()
WAIT_SHARE_OF_PASS = 0.25  # longest wait for busy sessions' next steps, as a share of the last pass
MAX_QUEUED_ITEMS = 1024  # work items queued or computing at once, all clients together
MAX_QUEUED_PER_CLIENT = 128  # ... and for one client (its sessions' steps and its Forward passes)


class _Abandoned(Exception):
    """Handed to a dropped item's ``on_error``: nobody was waiting for it."""


class _Exclusive:
    """Work for the compute thread that must run alone, after everything queued before it."""

    def __init__(self, work: Callable[[], None], loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]):
        self.work, self.loop, self.done = work, loop, done

    def run(self) -> None:
        try:
            self.work()
        except BaseException as error:  # handed to the awaiting coroutine
            self.loop.call_soon_threadsafe(self._fail, error)
        else:
            self.loop.call_soon_threadsafe(self._finish)

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class SpanExecutor:
    def __init__(
        self,
        span: Span,
        dtype: torch.dtype,
        device: str,
        num_threads: int | None = None,
        *,
        max_batch_tokens: int = 2048,
        batch_window_s: float = 0.010,
        max_queued: int = MAX_QUEUED_ITEMS,
        max_queued_per_client: int = MAX_QUEUED_PER_CLIENT,
        batch_invariant: bool = False,
    ):
        self.span = span
        self.dtype = dtype
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.batch_window_s = batch_window_s
        self.batch_invariant = batch_invariant  # one step per pass, fixed chunks (scheduler.plan_batch)
        self._num_threads = num_threads
        self._inbox: queue.SimpleQueue[WorkItem | object] = queue.SimpleQueue()
        self._ready: list[WorkItem] = []
        self._last_pass_sessions: set[object] = set()
        self._last_pass_s = 0.0
        self._exclusive: _Exclusive | None = None
        self.passes = 0  # counters for tests and the throughput benchmark
        self.batched_items = 0
        self.compute_seconds = 0.0
        self.dropped_items = 0  # abandoned work dropped before it was computed (or before its next chunk)
        self.max_queued = max_queued
        self.max_queued_per_client = max_queued_per_client
        self._queued = 0  # items submitted and not yet finished, failed or dropped
        self._queued_by_client: dict[str, int] = {}
        self._count_lock = threading.Lock()  # submit (event loop) and _retire (compute thread)
        self._thread = threading.Thread(target=self._run, name="span-compute", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, item: WorkItem) -> None:
        """Queues ``item``; its callbacks run on the compute thread.

        Raises ``ComputeBusyError`` (RESOURCE_EXHAUSTED: the client routes around this peer) when the
        queue is full overall or for the item's client.
        """
        with self._count_lock:
            mine = self._queued_by_client.get(item.client, 0)
            if self._queued >= self.max_queued:
                raise ComputeBusyError(f"this peer's compute queue is full ({self._queued} items); "
                                       "retry later or use another peer")
            if mine >= self.max_queued_per_client:
                raise ComputeBusyError(f"client {item.client[:64] or '(anonymous)'} already has {mine} items in "
                                       "this peer's compute queue, its limit; wait for them or use other peers")
            self._queued += 1
            self._queued_by_client[item.client] = mine + 1
        self.start()
        self._inbox.put(item)

    @property
    def queued(self) -> int:
        """Work items queued or computing now."""
        return self._queued

    def _retire(self, item: WorkItem) -> None:
        """Counts ``item`` out of the queue (finished, failed or dropped)."""
        with self._count_lock:
            self._queued -= 1
            left = self._queued_by_client.get(item.client, 1) - 1
            if left > 0:
                self._queued_by_client[item.client] = left
            else:
                self._queued_by_client.pop(item.client, None)

    def _drop_abandoned(self) -> None:
        """Forgets ready work nobody waits for; each dropped item's waiter (if any is left) is told."""
        kept = []
        for item in self._ready:
            if not item.abandoned:
                kept.append(item)
                continue
            self.dropped_items += 1
            self._retire(item)
            if item.on_error is not None:
                try:
                    item.on_error(item, _Abandoned("the work was abandoned before it was computed"))
                except Exception:
                    logger.exception("reporting a dropped step failed")
        self._ready = kept

    async def run_exclusive(self, work: Callable[[], None]) -> None:
        """Runs ``work`` on the compute thread once every step queued before it has finished: how a
        moving peer swaps its span without a step ever seeing half of it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self.start()
        self._inbox.put(_Exclusive(work, loop, done))  # not counted: the peer's own work, one at a time
        await done

    def to_device(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(device=self.device, dtype=self.dtype)

    # -- the compute thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        while True:
            if not self._ready and self._exclusive is None and not self._take(self._inbox.get()):
                return
            if not self._drain_inbox():
                return
            self._drop_abandoned()
            if self._ready:
                if self._exclusive is None and not self.batch_invariant:
                    self._wait_for_company()
                    self._drop_abandoned()
                plan = plan_batch(self._ready, self.max_batch_tokens, self.batch_invariant)
                try:
                    self._run_plan(plan)
                except Exception:  # a bug in one pass must not kill the thread
                    logger.exception("a compute pass failed")
                for item in self._ready:
                    if item.remaining <= 0:
                        self._retire(item)
                self._ready = [item for item in self._ready if item.remaining > 0]
            elif self._exclusive is not None:  # everything queued before it is done
                exclusive, self._exclusive = self._exclusive, None
                exclusive.run()

    def _take(self, got: object) -> bool:
        """Files one inbox entry; False means stop."""
        if got is _STOP:
            return False
        if isinstance(got, _Exclusive):
            self._exclusive = got
        else:
            self._ready.append(got)  # type: ignore[arg-type]
        return True

    def _drain_inbox(self) -> bool:
        """Takes whatever is queued, up to the next exclusive task (work after it waits for it)."""
        while self._exclusive is None:
            try:
                got = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if not self._take(got):
                return False
        return True

    def _wait_for_company(self) -> None:
        """Waits (bounded) for sessions that decoded in the last pass but have no step ready yet."""
        if self.batch_window_s <= 0 or not self._last_pass_sessions:
            return
        if any(not item.decode_sized for item in self._ready):
            return  # a prefill chunk is due anyway: do not delay it
        deadline = time.perf_counter() + min(self.batch_window_s, WAIT_SHARE_OF_PASS * self._last_pass_s)
        while True:
            present = {item.key for item in self._ready}
            if self._last_pass_sessions <= present:
                return
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            try:
                got = self._inbox.get(timeout=remaining)
            except queue.Empty:
                return
            if got is _STOP or isinstance(got, _Exclusive):
                self._inbox.put(got)  # handled by the main loop (it may reorder only behind this wait)
                return
            self._ready.append(got)  # type: ignore[arg-type]

    def _run_plan(self, plan: list[tuple[WorkItem, int]]) -> None:
        if not plan:
            return
        began = time.perf_counter()
        try:
            outputs = self._forward(plan)
        except Exception as error:  # isolate the item that broke the pass
            if len(plan) == 1:
                self._fail(plan[0][0], error)
                return
            logger.warning("a batched pass failed (%r); running its %d items one by one", error, len(plan))
            for entry in plan:
                self._run_plan([entry])
            return
        self._last_pass_s = time.perf_counter() - began
        self.compute_seconds += self._last_pass_s
        compute_ms = self._last_pass_s * 1000
        self.passes += 1
        self.batched_items += len(plan)
        self._last_pass_sessions = {item.key for item, _ in plan if item.decode_sized and item.session is not None}
        for (item, positions), output in zip(plan, outputs, strict=True):
            offset = item.done
            item.done += positions
            item.turn_at = time.perf_counter()  # batch-invariant mode: the rest of it waits its turn
            if item.on_chunk is not None:
                try:
                    item.on_chunk(item, output, offset, positions, compute_ms)
                except Exception:
                    logger.exception("delivering a result failed")

    def _forward(self, plan: list[tuple[WorkItem, int]]) -> list[torch.Tensor]:
        segments = []
        for item, positions in plan:
            session = item.session
            cache = session.cache if session is not None else None
            if cache is not None and item.done == 0:
                if item.start_position < cache.length:
                    cache.truncate(item.start_position)
                if item.capacity > session.paid_capacity:  # prepare_step pays first: a bug, not the client's
                    raise RuntimeError(f"cache growth to {item.capacity} positions was not paid for "
                                       f"({session.paid_capacity} are)")
                cache.grow(item.capacity)
            chunk = self.to_device(item.hidden[:, item.done : item.done + positions])
            lengths = None if item.rope_lengths is None else item.rope_lengths[item.done : item.done + positions]
            segments.append(Segment(chunk, item.pad_lengths, cache, lengths))
            if item.started_at is None:
                item.started_at = time.perf_counter()
        outputs = self.span.forward_segments(segments, plan[0][0].layers)
        return [out.to("cpu") for out in outputs]

    def _fail(self, item: WorkItem, error: BaseException) -> None:
        item.done = item.length  # drop it
        if item.on_error is not None:
            try:
                item.on_error(item, error)
            except Exception:
                logger.exception("reporting a failed step failed")

    def close(self) -> None:
        self._inbox.put(_STOP)
        if self._started:
            self._thread.join(5.0)
