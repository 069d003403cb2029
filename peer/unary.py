"""The peer's unary RPCs: ``Forward`` (a stateless pass), ``History`` (a session's kept outputs), ``Info``.

Mixed into ``PeerServicer`` (one gRPC service), whose state they read; kept apart from the
streaming ``Inference`` code because they share none of its session and outbox machinery.

Each is bounded: a client may have only so many ``Forward`` and ``History`` calls in flight here
(``max_unary_per_client`` each), a pass past the step deadline ends with DEADLINE_EXCEEDED, and a
pass whose call ended (cancelled, past the client's deadline) is dropped by the compute thread
instead of computed. ``History`` checks the token before it looks the session up, and a session
the caller does not own answers as an unknown one: session ids cannot be probed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import cached_property
from typing import Any

import grpc
import torch

from brigade.peer.config import PeerConfig
from brigade.peer.executor import SpanExecutor
from brigade.peer.limits import ClientSlots, StepDeadlineError
from brigade.peer.scheduler import WorkItem
from brigade.peer.sessions import SessionManager
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import (
    BrigadeError,
    ComputeError,
    InvalidRequestError,
    SessionLengthError,
    UnknownSessionError,
)
from brigade.protocol.messages import Hidden
from brigade.protocol.records import PROTOCOL_VERSION
from brigade.protocol.tensors import TensorLimits, encode

logger = logging.getLogger(__name__)


class UnaryRpcs:
    """Forward, History and Info over the servicer's config, sessions and compute thread."""

    config: PeerConfig
    model_name: str
    peer_id: str
    sessions: SessionManager
    executor: SpanExecutor
    hidden_size: int
    limits: TensorLimits
    _info_extra: Callable[[], dict[str, Any]]

    def _identify(self, token: pb.Token | None, purpose: str, binding: bytes) -> str:
        raise NotImplementedError  # PeerServicer's

    @cached_property
    def _forward_slots(self) -> ClientSlots:
        return ClientSlots("Forward", self.config.max_unary_per_client)

    @cached_property
    def _history_slots(self) -> ClientSlots:
        return ClientSlots("History", self.config.max_unary_per_client)

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        try:
            requester = self._identify(request.token if request.HasField("token") else None, "forward", b"")
            with self._forward_slots.hold(requester):
                return await self._forward(request, requester)
        except BrigadeError as error:
            logger.info("forward refused: %s", error)
            await refuse(context, error)
            return pb.ForwardResponse()  # nobody reads it: the client has gone

    async def _forward(self, request: pb.ForwardRequest, requester: str) -> pb.ForwardResponse:
        """Checks and computes one stateless pass (the caller holds one of its client's slots)."""
        start, end = request.start_layer, request.end_layer
        if not self.config.start_layer <= start < end <= self.config.end_layer:
            raise InvalidRequestError(
                f"layers {start}:{end} are not inside this peer's span "
                f"{self.config.start_layer}:{self.config.end_layer}"
            )
        hidden = Hidden.from_proto(request.hidden, self.limits, batch=None, width=self.hidden_size).tensor
        self._check_stateless_size(hidden)
        pads = list(request.pad_lengths) or [0] * hidden.shape[0]
        if len(pads) != hidden.shape[0] or any(pad >= hidden.shape[1] for pad in pads):
            raise InvalidRequestError("pad_lengths needs one value per sequence, each below its length")
        output, compute_ms = await self._stateless(hidden, torch.tensor(pads), (start, end), requester)
        return pb.ForwardResponse(hidden=encode(output, hidden.dtype), compute_ms=compute_ms)

    def _check_stateless_size(self, hidden: torch.Tensor) -> None:
        """A stateless pass is bounded like a session: its bytes alone would admit a pass whose
        attention costs hours of compute (a few MiB of a narrow model's hidden states, 10^5 positions)."""
        max_length = min(self.config.max_session_length, self.sessions.args.max_position_embeddings)
        if hidden.shape[1] > max_length:
            raise SessionLengthError(
                f"a stateless pass of {hidden.shape[1]} positions is longer than this peer's max length {max_length}")
        if hidden.shape[0] > self.config.max_batch_size:
            raise InvalidRequestError(
                f"batch of {hidden.shape[0]} is over this peer's limit {self.config.max_batch_size}")

    async def _stateless(self, hidden: torch.Tensor, pads: torch.Tensor, layers: tuple[int, int],
                         client: str) -> tuple[torch.Tensor, float]:
        """One pass on the compute thread; dropped there if this call ends first (cancelled, deadline)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[torch.Tensor, float]] = loop.create_future()

        def finish(item: WorkItem, output: torch.Tensor, offset: int, positions: int, compute_ms: float) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result((output, compute_ms)))

        def fail(item: WorkItem, error: BaseException) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_exception(
                ComputeError(f"the pass could not be computed here: {error}")))

        item = WorkItem(hidden=hidden, pad_lengths=pads, layers=layers, on_chunk=finish, on_error=fail, client=client)
        self.executor.submit(item)
        timeout_s = self.config.step_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await done
        except TimeoutError as error:
            raise StepDeadlineError(f"the pass did not finish within this peer's step deadline ({timeout_s:g} s); "
                                    "use another peer or a shorter pass") from error
        finally:
            item.cancelled = True  # a no-op once computed; otherwise the compute thread drops it

    async def History(self, request: pb.HistoryRequest, context: grpc.aio.ServicerContext) -> pb.HistoryResponse:
        try:
            # The token first, then the session: one the caller does not own is "unknown" to it.
            requester = self._identify(request.token if request.HasField("token") else None, "history",
                                       request.session_id.encode())
            with self._history_slots.hold(requester):
                session = self.sessions.sessions.get(request.session_id)
                if session is None or requester != session.owner:
                    raise UnknownSessionError(f"unknown session {request.session_id[:64]!r}")
                if session.outputs is None:
                    raise InvalidRequestError("this session was opened without keep_outputs")
                return pb.HistoryResponse(hidden=encode(session.outputs.read(request.start, request.end)))
        except BrigadeError as error:
            await refuse(context, error)
            return pb.HistoryResponse()  # nobody reads it: the client has gone

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        extra = self._info_extra()
        return pb.InfoResponse(
            peer_id=self.peer_id,
            model_name=self.model_name,
            start_layer=self.config.start_layer,
            end_layer=self.config.end_layer,
            num_layers=self.sessions.args.num_layers,
            hidden_size=self.hidden_size,
            dtype=self.config.dtype,
            quantization=self.config.quantization,
            version=PROTOCOL_VERSION,
            max_length=min(self.config.max_session_length, self.sessions.args.max_position_embeddings),
            free_cache_tokens=self.sessions.kv.free_tokens,
            open_sessions=len(self.sessions.sessions),
            state="online" if self.sessions.accepting else "leaving",
            throughput=float(extra.get("throughput", 0.0)),
            software_version=str(extra.get("software_version", "")),
            started_at=float(extra.get("started_at", 0.0)),
            cache_tokens=self.sessions.kv.capacity_tokens,
            compute_passes=self.executor.passes,
            computed_steps=self.executor.batched_items,
            compute_seconds=self.executor.compute_seconds,
            asyncio_tasks=len(asyncio.all_tasks()),  # this call's own task included
        )


async def refuse(context: grpc.aio.ServicerContext, error: BrigadeError) -> None:
    """Ends the call with ``error``'s status and message (gRPC's abort raises); returns only when the
    client has already gone (cancelled, disconnected) and there is no one left to tell.

    Aborting such a call fails inside gRPC (InternalError, which gRPC would log as an error of the
    servicer), so that case is checked first, and the race where the client leaves meanwhile caught.
    """
    if context.cancelled():
        logger.debug("the client left before it could be told: %s", error)
        return
    try:
        await context.abort(error.status, str(error))
    except grpc.aio.InternalError:
        if not (context.cancelled() or context.done()):
            raise
        logger.debug("the client left while it was told: %s", error)
