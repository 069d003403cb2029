"""Runs span compute on one thread per device, off the event loop.

The servicer awaits these calls; the event loop stays free to read and write other streams
while a step computes. One thread means steps never race on a cache or oversubscribe cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from brigade.kernels.llama import LlamaSpan
from brigade.peer.sessions import Session


class SpanExecutor:
    def __init__(self, span: LlamaSpan, dtype: torch.dtype, device: str, num_threads: int | None = None):
        self.span = span
        self.dtype = dtype
        self.device = device
        self._num_threads = num_threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute",
                                        initializer=self._init_thread)

    def _init_thread(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)

    async def step(
        self, session: Session, hidden: torch.Tensor, start_position: int, capacity: int
    ) -> tuple[torch.Tensor, float]:
        """Runs new positions of a session through its layers; returns output and compute ms."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._step, session, hidden, start_position, capacity)

    def _step(
        self, session: Session, hidden: torch.Tensor, start_position: int, capacity: int
    ) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        cache = session.cache
        if start_position < cache.length:
            cache.truncate(start_position)
        cache.grow(capacity)
        out = self.span(self._to_device(hidden), session.pad_lengths, cache, (session.start, session.end))
        return out.to("cpu"), (time.perf_counter() - began) * 1000

    async def forward(
        self, hidden: torch.Tensor, pad_lengths: torch.Tensor, layers: tuple[int, int]
    ) -> tuple[torch.Tensor, float]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._forward, hidden, pad_lengths, layers)

    def _forward(
        self, hidden: torch.Tensor, pad_lengths: torch.Tensor, layers: tuple[int, int]
    ) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        out = self.span(self._to_device(hidden), pad_lengths.to(self.device), None, layers)
        return out.to("cpu"), (time.perf_counter() - began) * 1000

    async def run_exclusive(self, work: Callable[[], None]) -> None:
        """Runs ``work`` on the compute thread once every step queued before it has finished
        (one worker, first in first out): how a moving peer swaps its span safely."""
        await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _to_device(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(device=self.device, dtype=self.dtype)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
