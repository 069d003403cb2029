"""The peer's one KV cache manager: every byte a session holds, paid from one pool, within per-client shares.

Shaped like vLLM v1's ``KVCacheManager.allocate_slots``: ``allocate`` grants pages or returns None,
and never raises for "full". The caller (session admission, a step's growth) decides what None
means: wait for pages to free up, refuse with ``CacheFullError`` / ``QuotaExceededError``, or (one
day) preempt; ``shortfall`` says which limit said no, so that the answer can name it.

A page is ``page_tokens`` positions of KV cache of one sequence over every hosted layer, and so
also a number of bytes (``page_bytes``). A session pays in pages for two things: its cache buffers
(a sliding window bounds what they cost) and its kept outputs (``keep_outputs``: hidden states by
position, which a short span or a windowed model can hold more of than its cache). Both count
against the same pool and the same owner's share, so a client cannot hold more than its share
however it splits it.

Growth is a second ``allocate`` on the same ``Allocation``; freeing returns all of it. A rollback
(truncation) keeps its pages: the buffers keep their size and the next steps write into them again.

Counting takes a lock: the books are read from the compute thread too (which grows buffers only
after their pages were granted here).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass


class Shortfall(enum.Enum):
    """Which limit refused a grant."""

    SESSIONS = "sessions"  # the owner already holds max_sessions_per_client sessions: refuse
    SHARE = "share"  # the grant would take the owner past its share of the pool: refuse
    POOL = "pool"  # too few free pages in the pool: others may free some, so waiting can help


@dataclass(frozen=True)
class Pages:
    """Pages granted by one ``allocate``, by use."""

    cache: int = 0  # KV cache buffers
    outputs: int = 0  # kept outputs

    @property
    def total(self) -> int:
        return self.cache + self.outputs


@dataclass
class Allocation:
    """What one session holds of the pool; counted against ``owner``'s share. Changed only by the manager."""

    owner: str  # client identity; "" (anonymous, --insecure swarms) has no share and no session cap
    cache_pages: int = 0
    output_pages: int = 0
    counted: bool = False  # among the owner's sessions: from its first grant until it is freed

    @property
    def pages(self) -> int:
        return self.cache_pages + self.output_pages


class KVCacheManager:
    """The pool of pages, the per-owner books, and the grants sessions hold."""

    def __init__(self, capacity_tokens: int, page_tokens: int, *, position_bytes: int, client_share: float = 1.0,
                 max_sessions_per_client: int = 64):
        if capacity_tokens <= 0 or page_tokens <= 0 or position_bytes <= 0:
            raise ValueError("cache capacity, page size and bytes per position must be positive")
        if not client_share > 0:
            raise ValueError(f"a client's share of the cache must be positive, got {client_share}")
        self.page_tokens = page_tokens
        self.page_bytes = page_tokens * position_bytes  # what a page of kept outputs may hold
        self.capacity_pages = capacity_tokens // page_tokens
        self.client_share = client_share
        self.max_sessions_per_client = max_sessions_per_client
        self._used_pages = 0
        self._owner_pages: dict[str, int] = {}
        self._owner_sessions: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- sizes -----------------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        """Pages for ``tokens`` pool positions (one sequence, every hosted layer)."""
        return -(-tokens // self.page_tokens)

    def pages_for_bytes(self, nbytes: int) -> int:
        """Pages for ``nbytes`` of anything else a session keeps (its kept outputs)."""
        return -(-nbytes // self.page_bytes)

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_pages * self.page_tokens

    @property
    def free_tokens(self) -> int:
        return (self.capacity_pages - self._used_pages) * self.page_tokens

    @property
    def share_pages(self) -> int:
        """The most pages one identified owner may hold (at least one, so a tiny pool still admits)."""
        return max(int(self.capacity_pages * self.client_share), 1)

    # -- granting --------------------------------------------------------------------------------
    def shortfall(self, allocation: Allocation, pages: int) -> Shortfall | None:
        """Which limit a grant of ``pages`` more to ``allocation`` would pass now; None when it fits."""
        with self._lock:
            return self._shortfall(allocation, pages)

    def _shortfall(self, allocation: Allocation, pages: int) -> Shortfall | None:
        owner = allocation.owner
        if owner:
            if not allocation.counted and self._owner_sessions.get(owner, 0) >= self.max_sessions_per_client:
                return Shortfall.SESSIONS
            if self._owner_pages.get(owner, 0) + pages > self.share_pages:
                return Shortfall.SHARE
        if self._used_pages + pages > self.capacity_pages:
            return Shortfall.POOL
        return None

    def allocate(self, allocation: Allocation, *, cache_pages: int = 0, output_pages: int = 0) -> Pages | None:
        """Grants ``cache_pages`` + ``output_pages`` more pages to ``allocation``; None (nothing granted)
        when a limit says no (``shortfall`` tells which). A first grant counts a session for its owner."""
        if cache_pages < 0 or output_pages < 0:
            raise ValueError(f"cannot allocate {cache_pages} + {output_pages} pages")
        pages = cache_pages + output_pages
        with self._lock:
            if self._shortfall(allocation, pages) is not None:
                return None
            self._used_pages += pages
            owner = allocation.owner
            self._owner_pages[owner] = self._owner_pages.get(owner, 0) + pages
            if not allocation.counted:
                allocation.counted = True
                self._owner_sessions[owner] = self._owner_sessions.get(owner, 0) + 1
            allocation.cache_pages += cache_pages
            allocation.output_pages += output_pages
        return Pages(cache_pages, output_pages)

    def free(self, allocation: Allocation) -> int:
        """Returns everything ``allocation`` holds to the pool (once; a second call frees nothing)."""
        with self._lock:
            pages = allocation.pages
            if pages > self._used_pages:
                raise RuntimeError(f"freeing {pages} pages but only {self._used_pages} are in use")
            self._used_pages -= pages
            allocation.cache_pages = allocation.output_pages = 0
            owner = allocation.owner
            if owner in self._owner_pages:
                self._owner_pages[owner] -= pages
            if allocation.counted:
                allocation.counted = False
                self._owner_sessions[owner] = self._owner_sessions.get(owner, 0) - 1
                if self._owner_sessions[owner] <= 0:
                    self._owner_sessions.pop(owner, None)
                    self._owner_pages.pop(owner, None)
            return pages

    # -- books -----------------------------------------------------------------------------------
    def usage(self, owner: str) -> tuple[int, int]:
        """(sessions, pool positions) ``owner`` holds now, kept outputs included."""
        with self._lock:
            return self._owner_sessions.get(owner, 0), self._owner_pages.get(owner, 0) * self.page_tokens

    def books(self) -> dict[str, tuple[int, int]]:
        """(sessions, pages) of every owner holding anything: empty once every session is freed."""
        with self._lock:
            return {owner: (self._owner_sessions.get(owner, 0), pages) for owner, pages in self._owner_pages.items()}
