"""Inference sessions on a peer: what a client may ask for, whose it is, and its cache memory.

A session belongs to the stream that opened it and dies with it. Its cache starts at one page
per sequence and grows geometrically, each growth paid for from the pool first. Every session
has an owner (the client identity that signed its open): one owner may hold only so many
sessions and so much of the pool, so one client cannot squat a peer's whole cache.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from brigade.kernels.cache import KVCache
from brigade.kernels.span import ModelArgs
from brigade.peer.config import PeerConfig
from brigade.peer.kv_cache import CachePool
from brigade.protocol.errors import (
    CacheFullError,
    InvalidRequestError,
    PeerLeavingError,
    QuotaExceededError,
    SessionLengthError,
)
from brigade.protocol.messages import NextHop, OpenSession, SessionLimits, Step

OUTBOX_SIZE = 256  # results waiting to be written to a session's client; more means the client stopped reading


class OutputHistory:
    """A session's outputs by position, kept for its client (replay after a failover, result checks).

    Stored in the wire dtype as sent, so what History returns hashes the same as what was
    forwarded. Grows like the cache and is truncated with it on rollback.
    """

    def __init__(self, batch: int, hidden_size: int, dtype: torch.dtype):
        self._buffer = torch.empty(batch, 0, hidden_size, dtype=dtype)
        self.length = 0

    def write(self, start: int, output: torch.Tensor) -> None:
        end = start + output.shape[1]
        if start > self.length:
            raise ValueError(f"output at position {start} leaves a gap after {self.length}")
        if output.dtype != self._buffer.dtype:
            self._buffer = self._buffer.to(output.dtype)
        if end > self._buffer.shape[1]:
            grown = self._buffer.new_empty(self._buffer.shape[0], max(end, 2 * self._buffer.shape[1]),
                                           self._buffer.shape[2])
            grown[:, : self.length] = self._buffer[:, : self.length]
            self._buffer = grown
        self._buffer[:, start:end] = output
        self.length = end

    def read(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start < end <= self.length:
            raise InvalidRequestError(f"positions {start}:{end} are not among the {self.length} kept")
        return self._buffer[:, start:end]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return self._buffer.numel() * self._buffer.element_size()


@dataclass
class Session:
    session_id: str
    start: int  # layers [start, end) this session runs
    end: int
    batch_size: int
    max_length: int
    pad_lengths: torch.Tensor  # [B] int64
    cache: KVCache
    reserved_pages: int
    owner: str = ""  # client identity that opened it ("" in --insecure swarms)
    upstream_peer_id: str = ""  # the previous hop, allowed to push steps in (forwarding)
    next: NextHop | None = None  # where outputs go instead of back to the client
    outputs: OutputHistory | None = None  # kept outputs (keep_outputs)
    max_bytes: int = 0  # input bytes this session may send in all
    bytes_received: int = 0
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    # Results for the client's stream, from whichever stream the steps came in on.
    outbox: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(OUTBOX_SIZE))
    forwarder: Any = None  # peer.forwarding.Forwarder while a next hop is linked
    step_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, whichever stream

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def layers(self) -> tuple[int, int]:
        return self.start, self.end


class SessionManager:
    """Opens, grows and closes sessions against one cache pool, with a share per owner."""

    def __init__(self, config: PeerConfig, args: ModelArgs, dtype: torch.dtype, device: str):
        self.config = config
        self.args = args
        self.dtype = dtype
        self.device = device
        self.pool = CachePool(config.cache_tokens, config.cache_page_tokens)
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        self._freed = asyncio.Event()  # set whenever pages go back to the pool
        self._owner_pages: dict[str, int] = {}
        self._owner_sessions: dict[str, int] = {}

    # -- opening ---------------------------------------------------------------------------------
    async def open(self, request: OpenSession, owner: str = "") -> Session:
        """Admits a session, waiting up to the client's open_timeout_s for cache pages to free up."""
        self._check_open(request, owner)
        capacity = min(request.max_length, self.pool.page_tokens)
        pages = self._pages(capacity, request.start_layer, request.end_layer) * request.batch_size
        self._check_share(owner, pages, new_session=True)
        wait_s = min(max(request.open_timeout_s, 0.0), self.config.max_admission_wait_s)
        deadline = time.monotonic() + wait_s
        while not self.pool.try_reserve(pages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CacheFullError(
                    f"KV cache is full: a new session needs {pages * self.pool.page_tokens} positions, "
                    f"{self.pool.free_tokens} of {self.pool.capacity_tokens} are free; retry later or use another peer"
                )
            self._freed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._freed.wait()
            except TimeoutError:
                pass
            self._check_open(request, owner)  # the peer may have started draining meanwhile
            self._check_share(owner, pages, new_session=True)
        try:
            cache = self.args.new_cache(request.start_layer, request.end_layer, request.batch_size, capacity,
                                        self.dtype, self.device)
        except BaseException:
            self._release_pages(pages)
            raise
        pads = list(request.pad_lengths)
        session = Session(
            session_id=request.session_id,
            start=request.start_layer,
            end=request.end_layer,
            batch_size=request.batch_size,
            max_length=request.max_length,
            pad_lengths=torch.tensor(pads, dtype=torch.long, device=self.device),
            cache=cache,
            reserved_pages=pages,
            owner=owner,
            upstream_peer_id=request.upstream_peer_id,
            next=request.next,
            outputs=OutputHistory(request.batch_size, self.args.hidden_size, torch.float32)
            if request.keep_outputs else None,
            max_bytes=self._session_byte_cap(request),
        )
        self.sessions[session.session_id] = session
        self._owner_pages[owner] = self._owner_pages.get(owner, 0) + pages
        self._owner_sessions[owner] = self._owner_sessions.get(owner, 0) + 1
        return session

    def _session_byte_cap(self, request: OpenSession) -> int:
        """What a session may send in all: its whole span four times over (prefill, replays, rollbacks)."""
        if self.config.max_session_bytes is not None:
            return self.config.max_session_bytes
        return 4 * request.batch_size * request.max_length * self.args.hidden_size * 4

    @property
    def limits(self) -> SessionLimits:
        """What this peer admits, for ``OpenSession.from_proto``."""
        positions = self.args.max_position_embeddings
        return SessionLimits(start_layer=self.config.start_layer or 0, end_layer=self.config.end_layer or 0,
                             max_batch_size=self.config.max_batch_size,
                             max_length=min(self.config.max_session_length, positions),
                             peer_max_length=self.config.max_session_length, model_positions=positions)

    def _check_open(self, request: OpenSession, owner: str) -> None:
        """What can change while a session waits for pages (the request itself was checked at from_proto)."""
        if not self.accepting:
            raise PeerLeavingError("this peer is shutting down and accepts no new sessions; route around it")
        if request.session_id in self.sessions:
            raise InvalidRequestError(f"session {request.session_id} is already open")

    def _check_share(self, owner: str, extra_pages: int, new_session: bool = False) -> None:
        """One owner may hold at most max_sessions_per_client sessions and client_cache_share of the pool."""
        if not owner:
            return
        if new_session and self._owner_sessions.get(owner, 0) >= self.config.max_sessions_per_client:
            raise QuotaExceededError(
                f"client {owner} already holds {self.config.max_sessions_per_client} sessions here, its limit; "
                "close some or use other peers"
            )
        share_pages = int(self.pool.capacity_pages * self.config.client_cache_share)
        held = self._owner_pages.get(owner, 0)
        if held + extra_pages > max(share_pages, 1):
            raise QuotaExceededError(
                f"client {owner} would hold {(held + extra_pages) * self.pool.page_tokens} of "
                f"{self.pool.capacity_tokens} cache positions, more than its share "
                f"({self.config.client_cache_share:.0%}); close sessions or use other peers"
            )

    # -- steps -----------------------------------------------------------------------------------
    def account_input(self, session: Session, nbytes: int) -> None:
        """Counts a step's input bytes against the session's cap before it is decoded."""
        if session.bytes_received + nbytes > session.max_bytes:
            raise CacheFullError(
                f"session {session.session_id} has sent {session.bytes_received} bytes; this step "
                f"({nbytes}) would pass its cap of {session.max_bytes}"
            )
        session.bytes_received += nbytes

    def prepare_step(self, session: Session, start_position: int, length: int) -> int:
        """Checks a step's positions and pays for the cache it needs; returns the new capacity.

        Runs on the event loop (the pool's accounting), before the compute thread grows buffers.
        """
        if session.closed or self.sessions.get(session.session_id) is not session:  # the peer closed it (moving)
            raise PeerLeavingError(f"session {session.session_id} was closed by this peer; reopen it elsewhere")
        if start_position > session.length:
            raise InvalidRequestError(
                f"step starts at position {start_position} but the session holds {session.length}"
            )
        needed = start_position + length
        if needed > session.max_length:
            raise SessionLengthError(
                f"step would reach position {needed}, past the session's max_length {session.max_length}"
            )
        session.last_used = time.monotonic()
        capacity = session.cache.capacity
        if needed <= capacity:
            return capacity
        page = self.pool.page_tokens
        wanted = min(session.max_length, max(needed, 2 * capacity))
        quota_error: QuotaExceededError | None = None
        for target in (wanted, needed):
            target = -(-target // page) * page if target < session.max_length else session.max_length
            extra = self._pages(target, session.start, session.end) * session.batch_size - session.reserved_pages
            try:
                self._check_share(session.owner, extra)
            except QuotaExceededError as error:
                quota_error = error
                continue
            if self.pool.try_reserve(extra):
                session.reserved_pages += extra
                self._owner_pages[session.owner] = self._owner_pages.get(session.owner, 0) + extra
                return target
        if quota_error is not None:
            raise quota_error
        raise CacheFullError(
            f"KV cache is full: the session needs {(needed - capacity) * session.batch_size} more positions, "
            f"{self.pool.free_tokens} of {self.pool.capacity_tokens} are free; retry later or use another peer"
        )

    def rope_lengths(self, session: Session, step: Step) -> torch.Tensor | None:
        """The call length of each of a step's positions [T], for a model whose rotary table depends on it.

        None for every other model (nothing to compute or forward). A step without them is a whole
        call (its values were bounded by ``Step.from_proto``).
        """
        if not self.args.rope_by_length:
            return None
        if not step.rope_lengths:
            whole = step.start_position + step.positions - int(session.pad_lengths.min())
            return torch.full((step.positions,), whole, dtype=torch.long)
        return torch.tensor(step.rope_lengths, dtype=torch.long)

    def _pages(self, capacity: int, start: int, end: int) -> int:
        """Pool pages per sequence for a cache that may reach ``capacity`` (a sliding window bounds it)."""
        return self.pool.pages_for(self.args.cache_positions(capacity, start, end))

    # -- closing ---------------------------------------------------------------------------------
    def _release_pages(self, pages: int) -> None:
        self.pool.release(pages)
        self._freed.set()

    def close(self, session_id: str) -> None:
        # The buffers are freed when the last reference goes: a step still computing (its client
        # gave up mid-step) finishes on them harmlessly instead of failing on emptied lists.
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        session.closed = True
        self._release_pages(session.reserved_pages)
        owner = session.owner
        self._owner_pages[owner] = self._owner_pages.get(owner, 0) - session.reserved_pages
        self._owner_sessions[owner] = self._owner_sessions.get(owner, 0) - 1
        if self._owner_sessions[owner] <= 0:
            self._owner_sessions.pop(owner, None)
            self._owner_pages.pop(owner, None)
        if session.forwarder is not None:
            session.forwarder.close()

    def owner_usage(self, owner: str) -> tuple[int, int]:
        """(sessions, cache positions) ``owner`` holds now."""
        return self._owner_sessions.get(owner, 0), self._owner_pages.get(owner, 0) * self.pool.page_tokens
