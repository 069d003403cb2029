"""Bounded KV cache memory: sessions take pages as they grow, never the whole max length up front.

Accounting is in positions (one sequence, every hosted layer) rounded up to pages. ``reserve``
answers yes or no at once; callers turn a no into a RESOURCE_EXHAUSTED status that says how much
is free, instead of letting an allocation fail deep in torch.
"""

from __future__ import annotations

import threading


class CachePool:
    """Counts cache positions handed out against a fixed budget."""

    def __init__(self, capacity_tokens: int, page_tokens: int):
        if capacity_tokens <= 0 or page_tokens <= 0:
            raise ValueError("cache capacity and page size must be positive")
        self.page_tokens = page_tokens
        self.capacity_pages = capacity_tokens // page_tokens
        self._used_pages = 0
        self._lock = threading.Lock()

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    @property
    def free_tokens(self) -> int:
        return (self.capacity_pages - self._used_pages) * self.page_tokens

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_pages * self.page_tokens

    def try_reserve(self, pages: int) -> bool:
        with self._lock:
            if self._used_pages + pages > self.capacity_pages:
                return False
            self._used_pages += pages
            return True

    def release(self, pages: int) -> None:
        with self._lock:
            if pages > self._used_pages:
                raise RuntimeError(f"releasing {pages} pages but only {self._used_pages} are in use")
            self._used_pages -= pages
