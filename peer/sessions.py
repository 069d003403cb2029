"""Inference sessions on a peer: validation of what a client asks for, and their cache memory.

A session belongs to the stream that opened it and dies with it. Its cache starts at one page
per sequence and grows geometrically, each growth paid for from the pool first.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import torch

from brigade.kernels.cache import KVCache
from brigade.kernels.llama import LlamaArgs
from brigade.peer.config import PeerConfig
from brigade.peer.kv_cache import CachePool
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import (
    CacheFullError,
    InvalidRequestError,
    PeerLeavingError,
    SessionLengthError,
)

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


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
    last_used: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return self.cache.length


class SessionManager:
    """Opens, grows and closes sessions against one cache pool."""

    def __init__(self, config: PeerConfig, args: LlamaArgs, dtype: torch.dtype, device: str):
        self.config = config
        self.args = args
        self.dtype = dtype
        self.device = device
        self.pool = CachePool(config.cache_tokens, config.cache_page_tokens)
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        self._freed = asyncio.Event()  # set whenever pages go back to the pool

    async def open(self, request: pb.OpenSession) -> Session:
        """Admits a session, waiting up to the client's open_timeout_s for cache pages to free up."""
        self._check_open(request)
        capacity = min(request.max_length, self.pool.page_tokens)
        pages = self.pool.pages_for(capacity) * request.batch_size
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
            self._check_open(request)  # the peer may have started draining meanwhile
        try:
            cache = KVCache.allocate(
                request.start_layer, request.end_layer, request.batch_size, self.args.num_kv_heads,
                self.args.head_dim, capacity, self.dtype, self.device,
            )
        except BaseException:
            self._release(pages)
            raise
        pads = list(request.pad_lengths) or [0] * request.batch_size
        session = Session(
            session_id=request.session_id,
            start=request.start_layer,
            end=request.end_layer,
            batch_size=request.batch_size,
            max_length=request.max_length,
            pad_lengths=torch.tensor(pads, dtype=torch.long, device=self.device),
            cache=cache,
            reserved_pages=pages,
        )
        self.sessions[session.session_id] = session
        return session

    def _check_open(self, request: pb.OpenSession) -> None:
        if not self.accepting:
            raise PeerLeavingError("this peer is shutting down and accepts no new sessions; route around it")
        if not SESSION_ID.match(request.session_id):
            raise InvalidRequestError("session_id must be 8 to 64 characters of [A-Za-z0-9_-]")
        if request.session_id in self.sessions:
            raise InvalidRequestError(f"session {request.session_id} is already open")
        start, end = request.start_layer, request.end_layer
        if not self.config.start_layer <= start < end <= self.config.end_layer:
            raise InvalidRequestError(
                f"layers {start}:{end} are not inside this peer's span "
                f"{self.config.start_layer}:{self.config.end_layer}"
            )
        if not 1 <= request.batch_size <= self.config.max_batch_size:
            raise InvalidRequestError(f"batch_size must be in [1, {self.config.max_batch_size}]")
        max_length = min(self.config.max_session_length, self.args.max_position_embeddings)
        if not 1 <= request.max_length <= max_length:
            raise InvalidRequestError(f"max_length must be in [1, {max_length}], got {request.max_length}")
        pads = list(request.pad_lengths) or [0] * request.batch_size
        if len(pads) != request.batch_size or any(pad >= request.max_length for pad in pads):
            raise InvalidRequestError("pad_lengths needs one value per sequence, each below max_length")

    def prepare_step(self, session: Session, start_position: int, length: int) -> int:
        """Checks a step's positions and pays for the cache it needs; returns the new capacity.

        Runs on the event loop (the pool's accounting), before the compute thread grows buffers.
        """
        if self.sessions.get(session.session_id) is not session:  # closed by the peer (moving to other layers)
            raise PeerLeavingError("this session was closed: the peer is moving to other layers; reopen it elsewhere")
        if start_position > session.length:
            raise InvalidRequestError(
                f"step starts at position {start_position} but the session holds {session.length}"
            )
        needed = start_position + length
        if needed > session.max_length:
            raise SessionLengthError(
                f"step would reach position {needed}, past the session's max_length {session.max_length}"
            )
        capacity = session.cache.capacity
        if needed <= capacity:
            return capacity
        page = self.pool.page_tokens
        wanted = min(session.max_length, max(needed, 2 * capacity))
        for target in (wanted, needed):
            target = -(-target // page) * page if target < session.max_length else session.max_length
            extra = self.pool.pages_for(target) * session.batch_size - session.reserved_pages
            if self.pool.try_reserve(extra):
                session.reserved_pages += extra
                return target
        raise CacheFullError(
            f"KV cache is full: the session needs {(needed - capacity) * session.batch_size} more positions, "
            f"{self.pool.free_tokens} of {self.pool.capacity_tokens} are free; retry later or use another peer"
        )

    def _release(self, pages: int) -> None:
        self.pool.release(pages)
        self._freed.set()

    def close(self, session_id: str) -> None:
        # The buffers are freed when the last reference goes: a step still computing (its client
        # gave up mid-step) finishes on them harmlessly instead of failing on emptied lists.
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self._release(session.reserved_pages)
