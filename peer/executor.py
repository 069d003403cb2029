"""The compute thread: one per device, running passes over the span for whatever work is ready.

The event loop only decodes, checks and enqueues; this thread takes everything that is ready,
asks the scheduler what the next pass computes (``plan_batch``), runs it as one batched forward
(``LlamaSpan.forward_segments``), and hands each chunk's output back through the item's callback.

A lone session pays nothing for batching: the thread blocks on its inbox and starts the moment a
step arrives. When other sessions were busy in the previous pass and have not sent their next
step yet, it waits for them up to ``batch_window_s`` (stopping as soon as they are all in), so
sessions decoding in step share passes instead of queueing behind each other.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from brigade.kernels.batch import Segment
from brigade.kernels.llama import LlamaSpan
from brigade.peer.scheduler import WorkItem, plan_batch

logger = logging.getLogger(__name__)

_STOP = object()


class SpanExecutor:
    def __init__(
        self,
        span: LlamaSpan,
        dtype: torch.dtype,
        device: str,
        num_threads: int | None = None,
        *,
        max_batch_tokens: int = 2048,
        batch_window_s: float = 0.002,
    ):
        self.span = span
        self.dtype = dtype
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.batch_window_s = batch_window_s
        self._num_threads = num_threads
        self._inbox: queue.SimpleQueue[WorkItem | object] = queue.SimpleQueue()
        self._ready: list[WorkItem] = []
        self._last_pass_sessions: set[object] = set()
        self.passes = 0  # counters for tests and the throughput benchmark
        self.batched_items = 0
        self._thread = threading.Thread(target=self._run, name="span-compute", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, item: WorkItem) -> None:
        """Queues ``item``; its callbacks run on the compute thread."""
        self.start()
        self._inbox.put(item)

    def to_device(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(device=self.device, dtype=self.dtype)

    # -- the compute thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        while True:
            if not self._ready:
                got = self._inbox.get()
                if got is _STOP:
                    return
                self._ready.append(got)  # type: ignore[arg-type]
            if not self._drain_inbox():
                return
            self._wait_for_company()
            plan = plan_batch(self._ready, self.max_batch_tokens)
            try:
                self._run_plan(plan)
            except Exception:  # a bug in one pass must not kill the thread
                logger.exception("a compute pass failed")
            self._ready = [item for item in self._ready if item.remaining > 0]

    def _drain_inbox(self) -> bool:
        while True:
            try:
                got = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if got is _STOP:
                return False
            self._ready.append(got)  # type: ignore[arg-type]

    def _wait_for_company(self) -> None:
        """Waits (bounded) for sessions that decoded in the last pass but have no step ready yet."""
        if self.batch_window_s <= 0 or not self._last_pass_sessions:
            return
        if any(not item.decode_sized for item in self._ready):
            return  # a prefill chunk is due anyway: do not delay it
        deadline = time.perf_counter() + self.batch_window_s
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
            if got is _STOP:
                self._inbox.put(_STOP)
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
        compute_ms = (time.perf_counter() - began) * 1000
        self.passes += 1
        self.batched_items += len(plan)
        self._last_pass_sessions = {item.key for item, _ in plan if item.decode_sized and item.session is not None}
        for (item, positions), output in zip(plan, outputs, strict=True):
            offset = item.done
            item.done += positions
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
                    if session.outputs is not None:
                        session.outputs.truncate(item.start_position)
                cache.grow(item.capacity)
            chunk = item.hidden[:, item.done : item.done + positions]
            segments.append(Segment(chunk, item.pad_lengths, cache))
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
