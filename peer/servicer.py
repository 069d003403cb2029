"""The gRPC service of a peer: check who asks and what, hand compute to the executor, send results.

Every client mistake becomes a typed error and a status with a readable message; the stream
that made it ends, its session's cache goes back to the pool, and the peer serves on.

A session's steps may arrive on the client's own stream or, with forwarding, pushed by the
previous hop on a stream of its own; either way its results go out on the client's stream, through
the session's outbox, in order. Each output chunk is signed (an attestation over the input and
output hashes), so what a peer returns is evidence of what it computed.

Nothing a client does can hold a session's pages past the idle timeout: every write to it has that
deadline (a client that stops reading is idle), an idle session is closed (its pages freed, its
queued work dropped) before its stream is told, and a step past the step deadline ends the stream
with DEADLINE_EXCEEDED. Nor is anything computed ahead of a client that does not read: a step's
answers wait for room in the session's outbox, bounded in bytes (``peer/outbox.py``), and that
stream reads no further step meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from brigade.peer.config import PeerConfig
from brigade.peer.executor import SpanExecutor
from brigade.peer.forwarding import ForwardChannels, Forwarder, ForwardError
from brigade.peer.limits import StepDeadlineError
from brigade.peer.outbox import post as _post
from brigade.peer.outbox import send as _send
from brigade.peer.pushes import take_push, vouched_push
from brigade.peer.scheduler import WorkItem
from brigade.peer.sessions import Session, SessionManager
from brigade.peer.unary import UnaryRpcs, refuse
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.attestation import attest, rope_digest, tensor_digest
from brigade.protocol.errors import (
    BrigadeError,
    ComputeError,
    InvalidRequestError,
    PermissionDeniedError,
    UnknownSessionError,
)
from brigade.protocol.identity import Identity
from brigade.protocol.messages import NextHop, OpenSession, Step
from brigade.protocol.tensors import TensorLimits, encode
from brigade.protocol.tokens import TokenVerifier

logger = logging.getLogger(__name__)

_EOF = object()  # outbox marker: the client finished; end its stream after what is queued


@dataclass
class _Chunk:
    output: torch.Tensor | None  # [B, n, H] on CPU, compute dtype
    offset: int  # positions into the step
    positions: int
    compute_ms: float
    queue_ms: float
    error: BaseException | None = None


class PeerServicer(UnaryRpcs, pb_grpc.PeerServicer):
    def __init__(
        self,
        config: PeerConfig,
        model_name: str,
        identity: Identity,
        sessions: SessionManager,
        executor: SpanExecutor,
        info_extra: Callable[[], dict[str, Any]],
        forward_channels: ForwardChannels | None = None,
    ):
        self.config = config
        self.model_name = model_name
        self.identity = identity
        self.peer_id = identity.peer_id
        self.sessions = sessions
        self.executor = executor
        self.hidden_size = sessions.args.hidden_size
        self.limits = TensorLimits(max_bytes=config.max_tensor_bytes)
        self.tokens = TokenVerifier(identity.peer_id)
        self._info_extra = info_extra
        # Next hops are dialed from their own signed records (peer/forwarding.py); none known: no forwarding.
        self._channels = forward_channels if forward_channels is not None else ForwardChannels(
            _no_records, allow_private=config.allows_private_targets, allow_insecure=config.insecure,
            max_message_bytes=config.max_message_bytes)

    # -- who is asking ---------------------------------------------------------------------------
    def _identify(self, token: pb.Token | None, purpose: str, binding: bytes) -> str:
        """The requester's id from its token; "" for anonymous requests in --insecure swarms."""
        if self.config.insecure and (token is None or not token.public_key):
            return ""
        requester = self.tokens.verify(token, purpose, binding)
        if requester in self.config.blocked_clients or (
            self.config.allowed_clients is not None and requester not in self.config.allowed_clients
        ):
            raise PermissionDeniedError(f"{requester} is not allowed to use this peer")
        return requester

    # -- Inference: the client's stream or a previous hop's push stream ----------------------------
    async def Inference(self, request_iterator: AsyncIterator[pb.InferenceRequest],
                        context: grpc.aio.ServicerContext) -> None:
        try:
            async with asyncio.timeout(self.config.session_idle_timeout_s):
                first = await context.read()
        except TimeoutError:
            await refuse(context, _IdleError("no request on a new stream"))
            return
        if first is grpc.aio.EOF:
            return
        kind = first.WhichOneof("kind")
        try:
            if kind == "open":
                await self._serve_client(first.open, context)
            elif kind == "attach":
                await self._serve_push(first.attach, context)
            elif kind == "step":
                raise UnknownSessionError(
                    f"unknown session {first.session_id[:64]!r}: open a session on this stream first")
            else:
                raise InvalidRequestError("a stream must start with open (a client) or attach (a previous hop)")
        except BrigadeError as error:
            logger.info("inference stream refused: %s", error)
            await refuse(context, error)

    async def _serve_client(self, message: pb.OpenSession, context: grpc.aio.ServicerContext) -> None:
        request = OpenSession.from_proto(message, self.sessions.limits)
        owner = self._identify(request.token, "open", request.session_id.encode())
        session = await self.sessions.open(request, owner)
        reader: asyncio.Task[None] | None = None
        try:
            if session.next is not None:
                session.forwarder = self._forwarder(session.next)
            write_s = self.config.session_idle_timeout_s
            await _write(context, pb.InferenceResponse(
                opened=pb.SessionOpened(session_id=session.session_id, max_length=session.max_length)), write_s)
            reader = asyncio.create_task(self._read_client(session, context), name=f"read-{session.session_id}")
            reader.add_done_callback(lambda task: _reader_ended(session, task))
            while True:
                item = await session.outbox.get()
                if item is _EOF:
                    return
                if isinstance(item, BrigadeError):
                    raise item
                await _write(context, item, write_s)
        finally:
            if reader is not None:
                reader.cancel()
            self.sessions.close(session.session_id)

    async def _read_client(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        """Reads the client's requests; ends the stream on EOF, an error, or a session idle too long."""
        idle_s = self.config.session_idle_timeout_s
        read: asyncio.Task[Any] | None = None
        try:
            while True:
                read = read or asyncio.ensure_future(context.read())
                done, _ = await asyncio.wait({read}, timeout=max(0.05, session.last_used + idle_s - time.monotonic()))
                if not done:
                    if time.monotonic() - session.last_used >= idle_s:  # pushed steps count as activity
                        self.sessions.close(session.session_id, expected=session)  # now, whatever the writer does
                        _post(session, _IdleError(f"session idle for over {idle_s:g} s; its cache was freed"))
                        return
                    continue
                request, read = read.result(), None
                if request is grpc.aio.EOF:
                    _post(session, _EOF)
                    return
                kind = request.WhichOneof("kind")
                if request.session_id and request.session_id != session.session_id:
                    raise UnknownSessionError(
                        f"unknown session {request.session_id!r}: this stream holds {session.session_id}")
                if kind == "step":
                    if not request.session_id:
                        raise UnknownSessionError("a step must name its session")
                    await self._step(session, request.step)
                elif kind == "relink":
                    self._relink(session, request.relink)
                    await _send(session, pb.InferenceResponse(relinked=pb.Relinked()), idle_s)
                elif kind == "open":
                    raise InvalidRequestError("this stream already has a session; open a new stream")
                else:
                    raise InvalidRequestError(f"unexpected {kind or 'empty'} request on an open session's stream")
        except BrigadeError as error:
            _post(session, error)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            _post(session, _EOF)  # the client is gone
        finally:
            if read is not None:
                # The call may end (abort, client gone) while this read waits: cancel it, and take its
                # outcome whatever it is, so that no "exception was never retrieved" is left behind.
                read.cancel()
                read.add_done_callback(_retrieve)

    async def _serve_push(self, attach: pb.Attach, context: grpc.aio.ServicerContext) -> None:
        # Who pushes, and whether it may, before any session is looked up: ids cannot be probed.
        pusher = self.tokens.verify(attach.token if attach.HasField("token") else None, "attach",
                                    attach.session_id.encode())
        pusher_key = bytes(attach.token.public_key)  # verified: the key the pusher signs its attestations with
        if not self.config.peer_filter.admits(pusher):
            raise PermissionDeniedError(f"{pusher} is not admitted by this peer's allowlist/blocklist of peers")
        if pusher in self.config.blocked_clients or (
                self.config.allowed_clients is not None and pusher not in self.config.allowed_clients):
            raise PermissionDeniedError(f"{pusher} is not allowed to use this peer")
        session = self.sessions.sessions.get(attach.session_id)
        if session is None or not session.upstream_peer_id or pusher != session.upstream_peer_id:
            # The same answer for a session that is not here and one whose previous hop is another peer.
            raise UnknownSessionError(f"unknown session {attach.session_id[:64]!r}: no session here names "
                                      "you as its previous hop")
        while True:
            try:
                async with asyncio.timeout(self.config.session_idle_timeout_s):
                    request = await context.read()
            except TimeoutError:
                return
            if request is grpc.aio.EOF or session.closed:
                return
            if request.WhichOneof("kind") != "step" or request.session_id != session.session_id:
                raise InvalidRequestError("a push stream carries only steps of its own session")
            if pusher != session.upstream_peer_id:
                raise PermissionDeniedError(f"{pusher} is no longer the previous hop of this session")
            # Refused: only this push stream ends, never the client's session (peer/pushes.py).
            parsed = take_push(session, request.step, self.limits, self.hidden_size)
            upstream = vouched_push(request.step, pusher, pusher_key, session.layers[0], parsed.hidden.digest)
            try:
                await self._step(session, request.step, upstream, parsed)
            except BrigadeError as error:
                _post(session, error)  # the client learns on its own stream, and this push stream ends
                raise
            except Exception as error:  # a bug here must not leave the client waiting out its step deadline
                _post(session, ComputeError(f"this peer failed on a pushed step ({type(error).__name__})"))
                raise

    def _relink(self, session: Session, relink: pb.Relink) -> None:
        if session.forwarder is not None:
            session.forwarder.close()
            session.forwarder = None
        if len(relink.upstream_peer_id) > 128:  # the open-time check, here too
            raise InvalidRequestError("upstream_peer_id is too long")
        session.next = NextHop.from_proto(relink.next) if relink.HasField("next") else None
        session.upstream_peer_id = relink.upstream_peer_id
        if session.next is not None:
            session.forwarder = self._forwarder(session.next)

    def _forwarder(self, next_hop: NextHop) -> Forwarder:
        forwarder = Forwarder(next_hop, self.identity, self._channels.channel_for, self.config.forward_timeout_s)
        if not self.config.peer_filter.admits(next_hop.peer_id):
            # Not an error of the client's: outputs go back to it (forward_error), and it links around.
            forwarder.broken = f"this peer does not forward to {next_hop.peer_id[:64]!r}: its peer filter refuses it"
        return forwarder

    # -- one step --------------------------------------------------------------------------------
    async def _step(self, session: Session, step: pb.Step, upstream: pb.Attestation | None = None,
                    parsed: Step | None = None) -> None:
        """Computes one step (in chunks when long) and sends each chunk on: to the next hop or the client.
        ``upstream``: the pusher's checked attestation of a pushed step, echoed in each result;
        ``parsed``: the step already checked (a push is, before anything is posted to the session)."""
        async with session.step_lock:
            await self._step_locked(session, step, upstream, parsed)

    async def _step_locked(self, session: Session, message: pb.Step, upstream: pb.Attestation | None,
                           parsed: Step | None) -> None:
        self.sessions.account_input(session, len(message.hidden.data))
        step = parsed or Step.from_proto(message, self.limits, batch=session.batch_size, width=self.hidden_size,
                                         max_length=session.max_length)
        session.last_push = (step.step_id, step.start_position + step.positions)  # pushes continue it or are newer
        hidden = step.hidden.tensor
        start = step.start_position
        rope_lengths = self.sessions.rope_lengths(session, step)
        capacity = self.sessions.prepare_step(session, start, hidden.shape[1], hidden.dtype)
        if session.outputs is not None:
            session.outputs.truncate(start)
        chunks: asyncio.Queue[_Chunk] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_chunk(item: WorkItem, output: torch.Tensor, offset: int, positions: int, compute_ms: float) -> None:
            queue_ms = ((item.started_at or item.enqueued_at) - item.enqueued_at) * 1000
            loop.call_soon_threadsafe(chunks.put_nowait, _Chunk(output, offset, positions, compute_ms, queue_ms))

        def on_error(item: WorkItem, error: BaseException) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, _Chunk(None, 0, 0, 0.0, 0.0, error))

        item = WorkItem(
            hidden=hidden, pad_lengths=session.pad_lengths, layers=session.layers, session=session,
            start_position=start, capacity=capacity, chunk_tokens=self.config.prefill_chunk_tokens,
            rope_lengths=rope_lengths, on_chunk=on_chunk, on_error=on_error, client=session.owner,
        )
        self.executor.submit(item)
        try:
            await self._gather_chunks(session, step, chunks, rope_lengths, upstream)
        except TimeoutError as error:
            raise StepDeadlineError(
                f"the step did not finish within this peer's step deadline ({self.config.step_timeout_s:g} s); "
                "use another peer or shorter steps") from error
        finally:
            item.cancelled = True  # whatever is left of it (a deadline, the stream gone) is dropped, not computed
        session.last_used = time.monotonic()

    async def _gather_chunks(self, session: Session, step: Step, chunks: asyncio.Queue[_Chunk],
                             rope_lengths: torch.Tensor | None, upstream: pb.Attestation | None) -> None:
        """Sends each computed chunk on as it comes, within the step deadline."""
        hidden = step.hidden.tensor
        whole_input_digest = step.hidden.digest
        done = 0
        async with asyncio.timeout(self.config.step_timeout_s):
            while done < hidden.shape[1]:
                chunk = await chunks.get()
                if chunk.error is not None:  # this peer's failure, not the request's: the client routes around it
                    raise ComputeError(f"the step could not be computed here: {chunk.error}") from chunk.error
                assert chunk.output is not None
                one_chunk = chunk.positions == hidden.shape[1]
                input_digest = whole_input_digest if one_chunk else tensor_digest(
                    encode(hidden[:, chunk.offset : chunk.offset + chunk.positions]))
                await self._send_chunk(session, step, hidden.dtype, chunk, input_digest, rope_lengths, upstream)
                done += chunk.positions

    async def _send_chunk(self, session: Session, step: Step, wire: torch.dtype, chunk: _Chunk,
                          input_digest: bytes, rope_lengths: torch.Tensor | None,
                          upstream: pb.Attestation | None) -> None:
        assert chunk.output is not None
        position = step.start_position + chunk.offset
        output = encode(chunk.output, wire)
        chunk_lengths = ([] if rope_lengths is None
                         else rope_lengths[chunk.offset : chunk.offset + chunk.positions].tolist())
        attestation = attest(self.identity, session.session_id, step.step_id, position, session.layers,
                             input_digest, tensor_digest(output), rope_digest(chunk_lengths))
        if session.outputs is not None:
            session.outputs.write(position, chunk.output.to(wire))
        result = pb.StepResult(
            length=position + chunk.positions, step_id=step.step_id, compute_ms=chunk.compute_ms,
            peer_leaving=not self.sessions.accepting, start_position=position, positions=chunk.positions,
            attestation=attestation, queue_ms=chunk.queue_ms, upstream=upstream,
            upstream_positions=step.positions if upstream is not None else 0,
        )
        if session.forwarder is not None:
            # A chunk is not the whole call: its rope lengths say which call it is of.
            forwarded = Step.proto(output, position, step.step_id, step.step_positions or step.positions, chunk_lengths,
                                   step.tickets)  # the client's tickets travel with its step (protocol/tickets.py)
            forwarded.pushed_by.CopyFrom(attestation)  # the next hop checks and echoes it (peer/pushes.py)
            try:
                await session.forwarder.send(forwarded)
                result.forwarded = True
            except ForwardError as error:
                logger.info("forwarding failed for session %s: %s", session.session_id, error)
                result.forward_error = str(error)
                session.forwarder = None  # the client re-links or carries on client-driven
        if not result.forwarded:
            result.hidden.CopyFrom(output)
        # Waits for the client to take earlier answers (no computing ahead of a client that does not
        # read); past the idle timeout the session is closed and the step fails (OutboxStalledError).
        await _send(session, pb.InferenceResponse(result=result), self.config.session_idle_timeout_s)

    async def close(self) -> None:
        await self._channels.close()


class _IdleError(BrigadeError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


async def _no_records() -> list[Any]:
    return []


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _write(context: grpc.aio.ServicerContext, message: pb.InferenceResponse, timeout_s: float) -> None:
    """Writes within ``timeout_s``: a client that takes nothing for that long is idle, and the call ends."""
    try:
        async with asyncio.timeout(timeout_s):
            await context.write(message)
    except TimeoutError as error:
        raise _IdleError(f"the client took no answer for {timeout_s:g} s; the session was closed") from error
    except Exception as error:  # gRPC's failed write (ExecuteBatchError) to a call the client already left
        if context.cancelled() or context.done():
            raise _IdleError("the client left; the session was closed") from error
        raise


def _reader_ended(session: Session, task: asyncio.Task[None]) -> None:
    """A reader that died of something unexpected still ends its stream (the writer waits on the outbox)."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    logger.error("session %s: its stream reader failed", session.session_id, exc_info=error)
    _post(session, ComputeError(f"this peer failed to serve the session ({type(error).__name__}); use another peer"))
