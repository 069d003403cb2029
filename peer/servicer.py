"""The gRPC service of a peer: decode and check requests, hand compute to the executor, encode.

Every client mistake becomes a typed error and a status with a readable message; the stream
that made it ends, its session's cache goes back to the pool, and the peer serves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import torch

from brigade.peer.config import PeerConfig
from brigade.peer.executor import SpanExecutor
from brigade.peer.sessions import Session, SessionManager
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.errors import BrigadeError, InvalidRequestError, InvalidTensorError, UnknownSessionError
from brigade.protocol.records import PROTOCOL_VERSION
from brigade.protocol.tensors import TensorLimits, decode, encode

logger = logging.getLogger(__name__)


class PeerServicer(pb_grpc.PeerServicer):
    def __init__(
        self,
        config: PeerConfig,
        model_name: str,
        peer_id: str,
        sessions: SessionManager,
        executor: SpanExecutor,
        info_extra: Callable[[], dict[str, object]],
    ):
        self.config = config
        self.model_name = model_name
        self.peer_id = peer_id
        self.sessions = sessions
        self.executor = executor
        self.hidden_size = sessions.args.hidden_size
        self.limits = TensorLimits(max_bytes=config.max_tensor_bytes)
        self._info_extra = info_extra

    def _check_hidden(self, hidden: torch.Tensor, batch: int | None = None) -> None:
        if hidden.dim() != 3 or hidden.shape[1] == 0:
            raise InvalidTensorError(f"hidden states must be [batch, positions>0, hidden], got {list(hidden.shape)}")
        if hidden.shape[2] != self.hidden_size:
            raise InvalidTensorError(
                f"hidden size {hidden.shape[2]} does not match the model's {self.hidden_size}"
            )
        if batch is not None and hidden.shape[0] != batch:
            raise InvalidTensorError(f"batch of {hidden.shape[0]} does not match the session's {batch}")

    async def Inference(
        self, request_iterator: AsyncIterator[pb.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferenceResponse]:
        session: Session | None = None
        requests = aiter(request_iterator)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.config.session_idle_timeout_s):  # a timer, not a task
                        request = await anext(requests)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"session idle for over {self.config.session_idle_timeout_s:.0f} s; its cache was freed",
                    )
                    return
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise InvalidRequestError("this stream already has a session; open a new stream")
                    session = await self.sessions.open(request.open)
                    yield pb.InferenceResponse(
                        opened=pb.SessionOpened(session_id=session.session_id, max_length=session.max_length)
                    )
                elif kind == "step":
                    if session is None or request.session_id != session.session_id:
                        raise UnknownSessionError(
                            f"unknown session {request.session_id!r}: open a session on this stream first"
                        )
                    yield await self._step(session, request.step)
                else:
                    raise InvalidRequestError("a request must carry either open or step")
        except BrigadeError as error:
            logger.info("inference stream refused: %s", error)
            await context.abort(error.status, str(error))
        finally:
            if session is not None:
                self.sessions.close(session.session_id)

    async def _step(self, session: Session, step: pb.Step) -> pb.InferenceResponse:
        hidden = decode(step.hidden, self.limits)
        self._check_hidden(hidden, session.batch_size)
        capacity = self.sessions.prepare_step(session, step.start_position, hidden.shape[1])
        out, compute_ms = await self.executor.step(session, hidden, step.start_position, capacity)
        return pb.InferenceResponse(
            result=pb.StepResult(
                hidden=encode(out, hidden.dtype),
                length=session.length,
                step_id=step.step_id,
                compute_ms=compute_ms,
                peer_leaving=not self.sessions.accepting,
            )
        )

    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardResponse:
        try:
            start, end = request.start_layer, request.end_layer
            if not self.config.start_layer <= start < end <= self.config.end_layer:
                raise InvalidRequestError(
                    f"layers {start}:{end} are not inside this peer's span "
                    f"{self.config.start_layer}:{self.config.end_layer}"
                )
            hidden = decode(request.hidden, self.limits)
            self._check_hidden(hidden)
            pads = list(request.pad_lengths) or [0] * hidden.shape[0]
            if len(pads) != hidden.shape[0] or any(pad >= hidden.shape[1] for pad in pads):
                raise InvalidRequestError("pad_lengths needs one value per sequence, each below its length")
            out, compute_ms = await self.executor.forward(hidden, torch.tensor(pads), (start, end))
            return pb.ForwardResponse(hidden=encode(out, hidden.dtype), compute_ms=compute_ms)
        except BrigadeError as error:
            logger.info("forward refused: %s", error)
            await context.abort(error.status, str(error))
            raise AssertionError("unreachable: abort raises") from error

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
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
            free_cache_tokens=self.sessions.pool.free_tokens,
            open_sessions=len(self.sessions.sessions),
            state="online" if self.sessions.accepting else "leaving",
            throughput=float(self._info_extra().get("throughput", 0.0)),
        )
