"""One hop of a client's session: the gRPC stream to a peer, what was sent to it, and its answers.

Each hop's stream has a reader task that queues every answer as it arrives, so the session can
wait on several hops at once (with forwarding, every hop of a run answers the same step) and a
late answer of an abandoned attempt is simply skipped by its step id.

That queue is bounded, in answers and in bytes (``answer_queue_limits``), by what nobody asked for:
the session tells the stream how many positions it asked for (``ask``) and each result taken pays
some back, so the answers of positions still asked for are always allowed. They can pile up honestly:
a run's hops are read in turn, and while the session reads the first hop's receipts of a long
prefill the last hop's full output chunks wait in its queue. On top of them a slack of a few
messages (relinks, a late answer of an abandoned attempt); a peer past that is sending answers
nobody asked for, and is a failed hop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from brigade.client.chunks import MESSAGE_OVERHEAD_BYTES, even_pieces
from brigade.client.remote import RemoteSwarm
from brigade.client.verify.evidence import Link
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.channels import handshake_failure
from brigade.protocol.errors import BrigadeError, from_status
from brigade.protocol.errors import PeerLeavingError as _PeerLeaving
from brigade.protocol.messages import history_answer
from brigade.protocol.tensors import WIRE_DTYPES
from brigade.protocol.tickets import new_push_key
from brigade.protocol.tokens import make_token
from brigade.routing.route import Hop

logger = logging.getLogger(__name__)

SEND_TIMEOUT_FLOOR_S = 10.0  # a write to a hop may wait this long for room, plus its bytes at the slowest uplink
SLOWEST_UPLINK_BYTES_S = 256 * 1024  # the slowest uplink given time (as History read-backs are)
MAX_QUEUED_ANSWERS = 1024  # answers of one hop waiting to be taken: far more than any step's chunks


def answer_queue_limits(config: Any, asked_positions: int = 0, position_bytes: int = 0) -> tuple[int, int]:
    """(answers, bytes) one hop's queue may hold: every answer of the ``asked_positions`` still asked
    for (at most one answer and ``position_bytes`` plus a message's framing per position), and on top
    two full messages' worth of bytes, what a relink and a late answer of an abandoned attempt take."""
    asked = max(0, asked_positions)
    return (MAX_QUEUED_ANSWERS + asked,
            2 * int(config.max_message_bytes) + asked * (position_bytes + MESSAGE_OVERHEAD_BYTES))


class HopFailure(Exception):
    """A hop did not answer correctly; its peer should be avoided (or left, when it is draining)."""

    def __init__(self, hop: Hop, reason: str, leaving: bool = False, lied: bool = False):
        super().__init__(f"peer {hop.peer.peer_id} ({hop.peer.address}, layers {hop.start}:{hop.end}): {reason}")
        self.hop = hop
        self.reason = reason
        self.leaving = leaving  # the peer is draining: avoid it, but it did nothing wrong
        self.lied = lied  # it signed for something other than what it answered: distrust it, not just ban it
        self.detected_after_s: float | None = None  # when first noticed, if before the step loop learnt of it


def classify(hop: Hop, error: BaseException, timeout: float | None = None) -> BaseException:
    """Turns what went wrong talking to a hop into a HopFailure (ban it, route around it).

    Whatever a peer answers, INVALID_ARGUMENT and OUT_OF_RANGE included, is that peer's word only:
    this client checked its own request before sending it (a wrong one never leaves as a request),
    so a refusal is a peer that is wrong, lying or unlike the others, and another may serve it.
    Cancellation and programming errors pass through unchanged.
    """
    if isinstance(error, grpc.aio.AioRpcError):
        handshake = handshake_failure(hop.peer.address, error.details() or "")
        if handshake is not None:
            return HopFailure(hop, handshake)
        error = from_status(error.code(), error.details() or "")
    if isinstance(error, HopFailure):
        return error
    if isinstance(error, _PeerLeaving):
        return HopFailure(hop, str(error), leaving=True)
    if isinstance(error, TimeoutError):
        return HopFailure(hop, f"no answer within {timeout or 0:.2f} s")
    if isinstance(error, asyncio.InvalidStateError):  # gRPC: writing to a call that already ended
        return HopFailure(hop, "the stream had already ended")
    if isinstance(error, BrigadeError | grpc.RpcError | ConnectionError | OSError):
        return HopFailure(hop, f"{type(error).__name__}: {error}")
    return error  # cancellation and programming errors propagate unchanged


class PositionLog:
    """Tensors ``[B, n, H]`` by position, in order: what this client sent a hop (to replay it)."""

    def __init__(self) -> None:
        self._chunks: list[tuple[int, torch.Tensor]] = []
        self.length = 0
        self.complete = True  # every position from 0 is here (false once a gap was skipped)

    def append(self, start: int, tensor: torch.Tensor) -> None:
        """Records ``tensor`` at ``start`` (forgetting anything from ``start`` on); a gap makes the log incomplete."""
        self.truncate(start)
        if start > self.length:
            self.clear()
            self.complete = False
            return
        self._chunks.append((start, tensor))
        self.length = start + tensor.shape[1]

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        kept = []
        for start, tensor in self._chunks:
            if start >= length:
                break
            kept.append((start, tensor[:, : length - start] if start + tensor.shape[1] > length else tensor))
        self._chunks = kept
        self.length = length

    def read(self, end: int) -> torch.Tensor:
        """Positions ``[0, end)``, which must all be held."""
        if end > self.length:
            raise ValueError(f"log holds {self.length} positions, not {end}")
        tensor = torch.cat([chunk for _, chunk in self._chunks], dim=1)
        return tensor[:, :end]

    def starts(self) -> list[int]:
        """Where each logged piece begins: the boundaries of the steps (or chunks) that were sent."""
        return [start for start, _ in self._chunks]

    def pieces(self) -> list[torch.Tensor]:
        """The logged tensors in order, without copying them (they are never written in place):
        ``torch.cat(pieces, dim=1)[:, :end]`` is ``read(end)``, done later or on another thread."""
        return [chunk for _, chunk in self._chunks]

    def clear(self) -> None:
        self._chunks = []
        self.length = 0
        self.complete = True


@dataclass
class _Ended:
    """The stream's end, as the reader task saw it."""

    error: BaseException


@dataclass
class HopStream:
    """One hop's open stream, its answers, and what the client knows of its inputs."""

    hop: Hop
    session_id: str
    call: grpc.aio.StreamStreamCall
    swarm: RemoteSwarm
    batch_size: int = 1  # sequences of the session
    forwards: bool = False  # this hop sends its outputs straight to the next hop's session
    receives_push: bool = False  # the previous hop forwards into this one (its inputs are not in `inputs`)
    session_next: pb.NextHop | None = None  # the links the peer holds for this session, as last set
    session_upstream: str = ""
    inputs: PositionLog = field(default_factory=PositionLog)  # what this client sent it
    step_ema_s: float | None = None  # typical time from its input leaving to its decode answer arriving
    leaving: bool = False
    reported_length: int = 0  # the session length the peer reported with its last step result
    attestations: list[pb.Attestation] = field(default_factory=list)  # newest last, bounded
    _attested: list[tuple[int, int | None]] = field(default_factory=list)  # (start, positions) of each kept one
    _answers: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)  # bounded by _read_answers
    _reader: asyncio.Task[None] | None = None
    queued_bytes: int = 0  # bytes of the answers in _answers
    max_length: int = 0  # the session's most positions (bounds what may be asked for at once)
    asked_positions: int = 0  # positions asked for (``ask``) whose results were not taken yet
    ended: bool = False  # the reader saw the stream end (or ended it)
    push_key: bytes = b""  # set: the peer takes pushes only with this client's tickets (protocol/tickets.py)

    @property
    def _limits(self) -> tuple[int, int]:
        config = self.swarm.config
        position_bytes = self.batch_size * int(self.swarm.hidden_size) * WIRE_DTYPES[config.wire_dtype].itemsize
        return answer_queue_limits(config, self.asked_positions, position_bytes)

    def ask(self, positions: int) -> None:
        """Positions whose results this hop will answer (call before sending what asks for them).

        Positions of an abandoned attempt that are never answered stay counted; the total is held
        to the session's length, so the bound stays that of one full session's answers.
        """
        self.asked_positions = min(max(self.max_length, positions), self.asked_positions + positions)

    @property
    def peer_id(self) -> str:
        return self.hop.peer.peer_id

    @classmethod
    async def open(
        cls,
        swarm: RemoteSwarm,
        hop: Hop,
        *,
        batch_size: int,
        max_length: int,
        pad_lengths: list[int],
        session_id: str | None = None,
        next_hop: pb.NextHop | None = None,
        upstream_peer_id: str = "",
        keep_outputs: bool = False,
    ) -> HopStream:
        config = swarm.config
        session_id = session_id or new_session_id()
        push_key = new_push_key() if hop.peer.push_tickets else b""
        call = swarm.stub(hop.peer).Inference()
        opened = pb.OpenSession(
            session_id=session_id, start_layer=hop.start, end_layer=hop.end, batch_size=batch_size,
            max_length=max_length, pad_lengths=pad_lengths, open_timeout_s=config.cache_wait_s,
            token=make_token(swarm.identity, hop.peer.peer_id, "open", session_id.encode()),
            upstream_peer_id=upstream_peer_id, keep_outputs=keep_outputs, push_key=push_key,
        )
        if next_hop is not None:
            opened.next.CopyFrom(next_hop)
        try:
            async with asyncio.timeout(config.open_timeout_s + config.cache_wait_s):
                await call.write(pb.InferenceRequest(open=opened))
                response = await call.read()
            if response is grpc.aio.EOF:
                raise from_status(await call.code(), await call.details() or "the peer closed the stream")
            if response.WhichOneof("kind") != "opened":
                raise HopFailure(hop, "answered an open with something else")
        except BaseException as error:
            call.cancel()
            failure = classify(hop, error, config.open_timeout_s)
            if failure is error:
                raise
            raise failure from error
        stream = cls(hop=hop, session_id=session_id, call=call, swarm=swarm, batch_size=batch_size,
                     max_length=max_length, forwards=next_hop is not None, push_key=push_key,
                     receives_push=bool(upstream_peer_id), session_next=next_hop, session_upstream=upstream_peer_id)
        stream.inputs.complete = not upstream_peer_id  # pushed inputs are the previous peer's, not logged here
        stream._reader = asyncio.create_task(stream._read_answers(), name=f"hop-{session_id}")
        return stream

    def next_hop(self) -> pb.NextHop:
        """How another peer reaches this hop's session (what its predecessor forwards to)."""
        return pb.NextHop(peer_id=self.peer_id, address=self.hop.peer.address, session_id=self.session_id,
                          tls_cert=self.hop.peer.tls_cert, relay_peer_id=self.hop.peer.relay_peer_id)

    async def _read_answers(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    code, details = await self.call.code(), await self.call.details()
                    self._end(_Ended(from_status(code, details or "the peer closed the stream")))
                    return
                size = response.ByteSize()
                max_answers, max_bytes = self._limits  # grows with what the session asked for since
                if self._answers.qsize() >= max_answers or self.queued_bytes + size > max_bytes:
                    self.call.cancel()  # stop taking them: what is queued is dropped with the hop
                    self._end(_Ended(HopFailure(self.hop, (
                        f"sent answers nobody asked for: over {self._answers.qsize()} answers "
                        f"({self.queued_bytes + size} bytes) unread, more than any step needs"))), drop=True)
                    return
                self.queued_bytes += size
                self._answers.put_nowait(response)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this reader is being stopped (the hop closed)
            # gRPC's read of a call cancelled under it (a timed-out send cancels the call): fail waits at once.
            self._end(_Ended(HopFailure(self.hop, "its stream was cancelled")))
        except BaseException as error:  # a broken connection
            self._end(_Ended(error))

    def _end(self, ended: _Ended, drop: bool = False) -> None:
        """Queues the stream's end (after what is queued, or instead of it when ``drop``)."""
        self.ended = True
        if drop:
            while not self._answers.empty():
                self._answers.get_nowait()
            self.queued_bytes = 0
        self._answers.put_nowait(ended)

    async def send(self, request: pb.InferenceRequest) -> None:
        """Writes ``request`` within a deadline that grows with its bytes: a peer that takes no data (hung,
        frozen, its flow-control window full) is this hop's failure, never a wait without end."""
        timeout_s = SEND_TIMEOUT_FLOOR_S + request.ByteSize() / SLOWEST_UPLINK_BYTES_S
        try:
            async with asyncio.timeout(timeout_s):
                await self.call.write(request)
        except TimeoutError as error:
            raise HopFailure(self.hop, f"took no data for {timeout_s:.1f} s") from error
        except BaseException as error:
            failure = classify(self.hop, error)
            if failure is error:
                raise
            raise failure from error

    async def answer(self, timeout_s: float) -> pb.InferenceResponse:
        """The next answer of this hop within ``timeout_s``; a HopFailure (or fatal error) otherwise."""
        try:
            async with asyncio.timeout(timeout_s):
                got = await self._answers.get()
        except TimeoutError as error:
            raise HopFailure(self.hop, f"no answer within {timeout_s:.2f} s") from error
        if not isinstance(got, _Ended):
            self.queued_bytes = max(0, self.queued_bytes - got.ByteSize())
            if got.WhichOneof("kind") == "result":  # what it answered is no longer asked for
                self.asked_positions = max(0, self.asked_positions - max(1, got.result.positions))
        if isinstance(got, _Ended):
            self._answers.put_nowait(got)  # every later wait fails the same way
            failure = classify(self.hop, got.error, timeout_s)
            raise failure from got.error
        return got

    async def relink(self, next_hop: pb.NextHop | None, upstream_peer_id: str, timeout_s: float) -> None:
        relink = pb.Relink(upstream_peer_id=upstream_peer_id)
        if next_hop is not None:
            relink.next.CopyFrom(next_hop)
        await self.send(pb.InferenceRequest(session_id=self.session_id, relink=relink))
        deadline = time.monotonic() + timeout_s
        while True:
            response = await self.answer(max(0.01, deadline - time.monotonic()))
            if response.WhichOneof("kind") == "relinked":
                break  # step results of an abandoned attempt may come first: they are skipped
        self.forwards = next_hop is not None

    async def history(self, end: int, timeout_s: float, most: int) -> torch.Tensor:
        """This hop's kept outputs for positions ``[0, end)`` (what its successor needs to be rebuilt),
        read ``most`` positions at a time so that no answer is over the message cap."""
        pieces = []
        try:
            for start, stop in even_pieces(0, end, most):
                request = pb.HistoryRequest(
                    session_id=self.session_id, start=start, end=stop,
                    token=make_token(self.swarm.identity, self.peer_id, "history", self.session_id.encode()),
                )
                response = await self.swarm.stub(self.hop.peer).History(request, timeout=timeout_s)
                pieces.append(history_answer(response, batch=self.batch_size, width=self.swarm.hidden_size,
                                             positions=stop - start))
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        except BaseException as error:
            failure = classify(self.hop, error, timeout_s)
            if failure is error:
                raise
            raise failure from error

    def keep_attestation(self, attestation: pb.Attestation, positions: int | None = None, limit: int = 4096) -> None:
        """Keeps ``attestation`` as evidence, with the ``positions`` its result covered (when known)."""
        self.attestations.append(attestation)
        self._attested.append((attestation.start_position, positions))
        if len(self.attestations) > limit:
            del self.attestations[: len(self.attestations) - limit]
        if len(self._attested) > limit:
            del self._attested[: len(self._attested) - limit]

    def signed_outputs(self, end: int) -> list[Link] | None:
        """The kept attestations that tile positions ``[0, end)`` as this hop holds them now, each with the
        positions its result covered; None when some position has none (or only one a rollback cut into).

        Each result's own length is used, not the gap to the next attestation: after a speculative
        rollback into a step, that gap is shorter than what the attestation's hashes cover.
        """
        links: list[Link] = []
        for attestation, (start, positions) in zip(self.attestations, self._attested, strict=True):
            while links and links[-1].start >= start:
                links.pop()  # rolled back: the peer recomputed from ``start`` on
            if links and (links[-1].length is None or links[-1].end > start):
                links[-1].truncated = True
            links.append(Link(attestation, length=positions))
        chosen = [link for link in links if link.start < end]
        if not chosen or chosen[0].start != 0 or any(link.truncated or link.length is None for link in chosen):
            return None
        for before, after in itertools.pairwise(chosen):
            if before.end != after.start:
                return None
        return chosen if chosen[-1].end == end else None

    async def close(self) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self.call.done_writing()
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
            pass
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()

    def cancel(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()


def new_session_id() -> str:
    return secrets.token_urlsafe(12)
