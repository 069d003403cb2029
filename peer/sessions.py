"""Inference sessions on a peer: what a client may ask for, whose it is, and what it holds.

A session belongs to the stream that opened it and dies with it. Its cache starts at one page
per sequence and grows geometrically; its kept outputs (when it asked for them) grow with it.
Every byte of both is granted by the KV cache manager (``peer/kv_cache.py``) before any buffer
grows; this module decides what a refusal means: a new session waits for pages up to its
``open_timeout_s``, a step that cannot grow is refused, and a client past its share is refused
at once. Every session has an owner (the client identity that signed its open): one owner may
hold only so many sessions and so much of the pool, so one client cannot squat a peer's cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from brigade.kernels.cache import KVCache
from brigade.kernels.memory import kv_bytes_per_token
from brigade.kernels.span import ModelArgs
from brigade.peer.config import PeerConfig
from brigade.peer.kv_cache import Allocation, KVCacheManager, Shortfall
from brigade.peer.outbox import OUTBOX_BYTES, Outbox
from brigade.peer.outputs import OutputHistory
from brigade.protocol.errors import (
    CacheFullError,
    InvalidRequestError,
    PeerLeavingError,
    QuotaExceededError,
    SessionLengthError,
)
from brigade.protocol.messages import NextHop, OpenSession, SessionLimits, Step

OUTPUT_DTYPE = torch.float32  # kept outputs before the first step names its wire dtype (the widest one)


@dataclass
class Session:
    session_id: str
    start: int  # layers [start, end) this session runs
    end: int
    batch_size: int
    max_length: int
    pad_lengths: torch.Tensor  # [B] int64
    cache: KVCache
    allocation: Allocation  # the pages it holds (cache and kept outputs), granted by the KV cache manager
    paid_capacity: int  # positions the cache may grow to: paid for, so the compute thread may grow it
    owner: str = ""  # client identity that opened it ("" in --insecure swarms)
    upstream_peer_id: str = ""  # the previous hop, allowed to push steps in (forwarding)
    # (step id, end position) of the last step taken, pushed or the client's own: a push must continue
    # it or start a newer step (peer/pushes.py), so a ticket held back through client-driven steps is stale
    last_push: tuple[int, int] | None = None
    push_key: bytes = b""  # set: a push needs its client's ticket (protocol/tickets.py)
    push_refusals_told: int = 0  # PushRefused answers posted to the client (peer/pushes.py bounds them)
    next: NextHop | None = None  # where outputs go instead of back to the client
    outputs: OutputHistory | None = None  # kept outputs (keep_outputs)
    max_bytes: int = 0  # input bytes this session may send in all
    bytes_received: int = 0
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    # Results for the client's stream, from whichever stream the steps came in on; bounded in count
    # and bytes, and a step waits for room (peer/outbox.py): a client that does not read stalls it.
    outbox: Outbox = field(default_factory=Outbox)
    forwarder: Any = None  # peer.forwarding.Forwarder while a next hop is linked
    step_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, whichever stream
    # Closes it and frees its pages (set by the manager): for paths that find the client gone or not
    # reading (a full outbox) and must not leave its pages held until the call itself ends.
    release: Callable[[], None] | None = None

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def layers(self) -> tuple[int, int]:
        return self.start, self.end


class SessionManager:
    """Opens, grows and closes sessions, paying for what they hold through one KV cache manager."""

    def __init__(self, config: PeerConfig, args: ModelArgs, dtype: torch.dtype, device: str):
        self.config = config
        self.args = args
        self.dtype = dtype
        self.device = device
        layers = (config.end_layer - config.start_layer if config.start_layer is not None
                  and config.end_layer is not None else args.num_layers)
        if config.cache_tokens is None:
            raise ValueError("the KV cache size (cache_tokens) must be planned before sessions are served")
        self.kv = KVCacheManager(config.cache_tokens, config.cache_page_tokens,
                                 position_bytes=kv_bytes_per_token(args, dtype.itemsize, max(layers, 1)),
                                 client_share=config.client_cache_share,
                                 max_sessions_per_client=config.max_sessions_per_client)
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        self._freed = asyncio.Event()  # set whenever pages go back to the pool

    # -- opening ---------------------------------------------------------------------------------
    async def open(self, request: OpenSession, owner: str = "") -> Session:
        """Admits a session, waiting up to the client's open_timeout_s for cache pages to free up."""
        self._check_open(request, owner)
        capacity = min(request.max_length, self.kv.page_tokens)
        cache_pages = self._pages(capacity, request.start_layer, request.end_layer) * request.batch_size
        output_pages = (self._output_pages(request.batch_size, capacity, OUTPUT_DTYPE)
                        if request.keep_outputs else 0)
        pages = cache_pages + output_pages
        allocation = Allocation(owner)
        wait_s = min(max(request.open_timeout_s, 0.0), self.config.max_admission_wait_s)
        deadline = time.monotonic() + wait_s
        while self.kv.allocate(allocation, cache_pages=cache_pages, output_pages=output_pages) is None:
            shortfall = self.kv.shortfall(allocation, pages)
            if shortfall in (Shortfall.SESSIONS, Shortfall.SHARE):
                raise self._quota_error(allocation, pages, shortfall)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CacheFullError(
                    f"KV cache is full: a new session needs {pages * self.kv.page_tokens} positions, "
                    f"{self.kv.free_tokens} of {self.kv.capacity_tokens} are free; retry later or use another peer"
                )
            self._freed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._freed.wait()
            except TimeoutError:
                pass
            self._check_open(request, owner)  # the peer may have started draining meanwhile
        try:
            cache = self.args.new_cache(request.start_layer, request.end_layer, request.batch_size, capacity,
                                        self.dtype, self.device)
        except BaseException:
            self._free(allocation)
            raise
        outputs = (OutputHistory(request.batch_size, self.args.hidden_size, OUTPUT_DTYPE,
                                 paid_bytes=allocation.output_pages * self.kv.page_bytes)
                   if request.keep_outputs else None)
        session = Session(
            session_id=request.session_id,
            start=request.start_layer,
            end=request.end_layer,
            batch_size=request.batch_size,
            max_length=request.max_length,
            pad_lengths=torch.tensor(list(request.pad_lengths), dtype=torch.long, device=self.device),
            cache=cache,
            allocation=allocation,
            paid_capacity=capacity,
            owner=owner,
            upstream_peer_id=request.upstream_peer_id,
            push_key=request.push_key,
            next=request.next,
            outputs=outputs,
            max_bytes=self._session_byte_cap(request),
            outbox=Outbox(max_bytes=min(OUTBOX_BYTES, 2 * self.config.max_message_bytes)),
        )
        session.release = lambda: self.close(session.session_id, expected=session)
        self.sessions[session.session_id] = session
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

    def _quota_error(self, allocation: Allocation, extra_pages: int, shortfall: Shortfall) -> QuotaExceededError:
        """What a client past one of its limits is told: max_sessions_per_client or client_cache_share."""
        owner = allocation.owner
        if shortfall is Shortfall.SESSIONS:
            return QuotaExceededError(
                f"client {owner} already holds {self.config.max_sessions_per_client} sessions here, its limit; "
                "close some or use other peers"
            )
        _, held = self.kv.usage(owner)
        return QuotaExceededError(
            f"client {owner} would hold {held + extra_pages * self.kv.page_tokens} of "
            f"{self.kv.capacity_tokens} cache positions (cache and kept outputs), more than its share "
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

    def prepare_step(self, session: Session, start_position: int, length: int,
                     wire: torch.dtype = OUTPUT_DTYPE) -> int:
        """Checks a step's positions and pays for what it needs; returns the cache capacity to grow to.

        Pays for the cache and, for a session that keeps outputs, for its outputs in ``wire`` (the
        step's dtype, which they are kept in). Runs on the event loop, before the compute thread
        grows the cache and before the outputs are written.
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
        outputs = session.outputs
        if needed <= capacity and (outputs is None or outputs.paid_positions(wire) >= capacity):
            return capacity
        page = self.kv.page_tokens
        wanted = min(session.max_length, max(needed, 2 * capacity))
        quota_error: QuotaExceededError | None = None
        for target in (wanted, needed) if needed > capacity else (capacity,):
            target = -(-target // page) * page if target < session.max_length else session.max_length
            allocation = session.allocation
            cache_extra = max(0, self._pages(target, session.start, session.end) * session.batch_size
                              - allocation.cache_pages)
            output_extra = (max(0, self._output_pages(session.batch_size, target, wire) - allocation.output_pages)
                            if outputs is not None else 0)
            if self.kv.allocate(allocation, cache_pages=cache_extra, output_pages=output_extra) is not None:
                session.paid_capacity = max(session.paid_capacity, target)
                if outputs is not None:
                    outputs.paid_bytes = allocation.output_pages * self.kv.page_bytes
                return target
            shortfall = self.kv.shortfall(allocation, cache_extra + output_extra)
            if shortfall in (Shortfall.SESSIONS, Shortfall.SHARE):
                quota_error = self._quota_error(allocation, cache_extra + output_extra, shortfall)
        if quota_error is not None:
            raise quota_error
        raise CacheFullError(
            f"KV cache is full: the session needs {max(needed - capacity, 0) * session.batch_size} more positions"
            f"{' and room for its kept outputs' if outputs is not None else ''}, "
            f"{self.kv.free_tokens} of {self.kv.capacity_tokens} are free; retry later or use another peer"
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
        return self.kv.pages_for(self.args.cache_positions(capacity, start, end))

    def _output_pages(self, batch: int, positions: int, dtype: torch.dtype) -> int:
        """Pool pages for kept outputs of ``positions`` positions of ``batch`` sequences in ``dtype``."""
        return self.kv.pages_for_bytes(batch * positions * self.args.hidden_size * dtype.itemsize)

    # -- closing ---------------------------------------------------------------------------------
    def _free(self, allocation: Allocation) -> None:
        self.kv.free(allocation)
        self._freed.set()

    def close(self, session_id: str, expected: Session | None = None) -> None:
        """Ends a session and frees all it holds: cache and kept outputs. Idempotent.

        The buffers are freed when the last reference goes: a step still computing (its client gave
        up mid-step) finishes on them harmlessly instead of failing on emptied lists; its queued
        work is dropped by the compute thread (the session is marked closed). ``expected``: close
        only that session object (a later session may have reused the id).
        """
        session = self.sessions.get(session_id)
        if session is None or (expected is not None and session is not expected):
            return
        del self.sessions[session_id]
        session.closed = True
        session.outbox.close()  # a step waiting for room lets go (its answer has nobody to go to)
        self._free(session.allocation)
        if session.forwarder is not None:
            session.forwarder.close()

    def owner_usage(self, owner: str) -> tuple[int, int]:
        """(sessions, pool positions) ``owner`` holds now, kept outputs included."""
        return self.kv.usage(owner)
