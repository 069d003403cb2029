"""An inference session through the swarm, surviving peers that crash, hang or leave.

Each hop of the route is one gRPC stream holding its span's KV cache. With forwarding (the
default), the client opens every hop's session itself and links them, so each peer sends its
outputs straight to the next one and only the last hop's answer comes back with tensors; the
others answer with signed receipts. Where a pair of peers cannot reach each other the client
carries that pair's activations itself (client-driven), as it does for every pair when forwarding
is off; so does a pair whose receiver fails on what its sender says it pushed (the sender may never
have pushed, or pushed something else), before anyone is banned. A long step moves in chunks, so
the second peer works on chunk 1 while the first computes chunk 2.

Failover is one loop (``step``): an attempt runs the step over the route; when a hop fails
(connection lost, deadline passed, error status, a wrong answer) its peer is banned with backoff,
a new chain of peers is found for exactly its layers, rebuilt by replaying its inputs (kept by
this client, or by the previous peer with ``keep_outputs``) as one prefill (in messages under the
cap, cut where the original steps were: ``client/chunks.py``), linked back in, and the step is
attempted again from the start: every hop rolls back to the step's first position by itself, so
no hop ever holds half a step. A peer that says it is leaving is moved away from the same way,
without a ban. The caller sees the same tokens as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import torch

from brigade.client.arrival import check_on_arrival
from brigade.client.budget import Budget, RecoveryExhaustedError
from brigade.client.chunks import even_pieces, positions_per_message
from brigade.client.handover import Pushed, check_handover
from brigade.client.hops import HopFailure, HopStream
from brigade.client.recovery import FailoverEvent, ForwardBroken, RouteRepair
from brigade.client.remote import RemoteSwarm
from brigade.client.standing import PeerStanding
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import rope_digest
from brigade.protocol.errors import BadAnswerError, InvalidTensorError
from brigade.protocol.messages import StepAnswer
from brigade.protocol.tensors import WIRE_DTYPES, encode
from brigade.protocol.tickets import run_tickets
from brigade.routing.route import Hop

logger = logging.getLogger(__name__)

DECODE_SIZED = 8  # steps of at most this many positions get deadlines from measured step times


class InferenceSession(RouteRepair):
    """Steps hidden states through every hop of a route, keeping each hop's cache in step."""

    def __init__(
        self, swarm: RemoteSwarm, standing: PeerStanding, batch_size: int, max_length: int, pad_lengths: list[int]
    ):
        self.swarm = swarm
        self.config = swarm.config
        self.standing = standing  # bans, leaving, distrusted: shared by the model's sessions
        self.unforwardable: set[tuple[str, str]] = set()  # peer pairs of this session that could not reach each other
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_lengths = pad_lengths
        self.position = 0
        self.hops: list[HopStream] = []
        self.events: list[FailoverEvent] = []
        self.step_listeners: list = []  # callables(session, start, positions) after each completed step
        self.close_hooks: list[Callable[[], Awaitable[None]]] = []  # awaited first by close() (listeners' tasks)
        self._wire_dtype = WIRE_DTYPES[self.config.wire_dtype]
        self._step_id = 0
        # Per position so far: the length of the step (forward call) it was computed in, for models whose
        # rotary table depends on it. Every hop, replay and re-check sends these, so a rebuilt cache
        # and a re-run compute exactly what the original steps did.
        self.rope_lengths: list[int] = []

    def rope_lengths_for(self, start: int, end: int) -> list[int]:
        """The call lengths of positions [start, end) as sent with a step ([] when the rope ignores them)."""
        return self.rope_lengths[start:end] if self.swarm.rope_by_length else []

    def message_positions(self) -> int:
        """Positions of this session's activations that fit one message (``client/chunks.py``)."""
        cap = min(self.config.max_step_bytes, self.config.max_message_bytes)
        return positions_per_message(self.batch_size, self.swarm.hidden_size, self._wire_dtype.itemsize, cap)

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.hops]

    async def open(self) -> None:
        budget = Budget(self.config.retry_budget_s, self.config.max_attempts)
        self.hops = await self._build_with_retries(0, self.swarm.num_layers, None, budget)

    # -- the step loop -----------------------------------------------------------------------------
    async def step(self, hidden: torch.Tensor, start_position: int | None = None,
                   rope_lengths: list[int] | None = None) -> torch.Tensor:
        """Runs [B, T, H] new positions through the route; returns the last hop's [B, T, H].

        ``start_position`` below the current length first rolls every hop back to it (speculative
        decoding drops rejected positions this way). ``rope_lengths`` (length-dependent ropes only):
        each new position's call length; by default the step is one call.
        """
        start = self.position if start_position is None else start_position
        length = hidden.shape[1]
        if not 0 <= start <= self.position:
            raise ValueError(f"a step may start at most at the session's length {self.position}, not {start}")
        if start + length > self.max_length:
            raise ValueError(f"session of max_length {self.max_length} cannot take positions up to {start + length}")
        budget = Budget(self.config.retry_budget_s, self.config.max_attempts)
        failure: HopFailure | None = None
        broken: ForwardBroken | None = None
        began = time.monotonic()
        if self.swarm.rope_by_length:  # transformers' max(position_ids) + 1 of this call
            if rope_lengths is None:
                rope_lengths = [start + length - min(self.pad_lengths)] * length
            if len(rope_lengths) != length:
                raise ValueError(f"{len(rope_lengths)} rope lengths for a step of {length} positions")
            self.rope_lengths[start:] = rope_lengths
        while True:
            # Recovery work may itself meet a dead peer (a relink to a neighbour that died too): that
            # failure is handled on the next round like any other, so the loop is the only recovery path.
            try:
                if failure is not None:
                    handling, failure = failure, None
                    event = self._note_failure(handling, time.monotonic() - began)
                    index = self._find(handling.hop)
                    if index is not None:
                        await self._replace(index, start, budget, event)
                if broken is not None:
                    handling_broken, broken = broken, None
                    if handling_broken.index + 1 < len(self.hops):
                        await self._unlink_broken(handling_broken)
                await self._leave_distrusted(start, budget)
                await self._migrate_leaving(start, budget)
                began = time.monotonic()
                output = await self._attempt(hidden, start)
                break
            except HopFailure as error:
                budget.spend(error)
                failure = error
            except ForwardBroken as error:
                budget.spend(error)
                error.detected_after_s = time.monotonic() - began
                broken = error
        self.position = start + length
        for listener in self.step_listeners:
            listener(self, start, length)
        return output

    async def _unlink_broken(self, broken: ForwardBroken) -> None:
        """Unlinks a broken pair; a suspected next hop that cannot acknowledge it within a decode step's
        deadline has failed by itself (hung or gone), noticed when its step first failed."""
        suspect = broken.suspect
        receiver = self.hops[broken.index + 1]
        quick = None
        if suspect is not None and receiver.hop == suspect:  # its own deadline for a decode step (floor x 2 unmeasured)
            measured = receiver.step_ema_s is not None
            own = self._timeout(receiver, True) if measured else 2 * self.config.decode_timeout_floor_s
            quick = min(self.config.open_timeout_s, own)
        try:
            await self._unlink(broken.index, str(broken), quick)
        except HopFailure as failure:
            if quick is not None and failure.hop == suspect:
                failure.detected_after_s = broken.detected_after_s
            raise

    async def _attempt(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """One try of a step over the current route, run by run (a run: hops linked by forwarding)."""
        self._step_id += 1
        length = hidden.shape[1]
        for stream in self.hops:
            stream.inputs.truncate(start)

        async def first_input() -> AsyncIterator[tuple[int, torch.Tensor]]:
            yield start, hidden

        source: AsyncIterator[tuple[int, torch.Tensor]] = first_input()
        index = 0
        while index < len(self.hops):
            last = index
            while self.hops[last].forwards and last + 1 < len(self.hops):
                last += 1
            source = self._through_run(index, last, source, start, length)
            if not self.config.pipeline_prefill:
                source = _buffered(source)
            index = last + 1
        pieces = [chunk async for _, chunk in source]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    async def _through_run(
        self, first: int, last: int, source: AsyncIterator[tuple[int, torch.Tensor]], start: int, length: int
    ) -> AsyncIterator[tuple[int, torch.Tensor]]:
        """Sends ``source``'s chunks to hop ``first`` and yields hop ``last``'s output chunks as they come."""
        streams = self.hops[first : last + 1]
        step_id = self._step_id
        sent_at: list[float] = []

        async def feed() -> None:
            most = self.message_positions()  # a longer chunk goes in pieces under the message cap
            # One per hop the step is pushed into: without it that hop computes no push (protocol/tickets.py).
            tickets = run_tickets([(stream.push_key, stream.session_id) for stream in streams[1:] if stream.push_key],
                                  step_id, start, length)
            async for chunk_start, whole in source:
                for offset, stop in even_pieces(0, whole.shape[1], most):
                    position, chunk = chunk_start + offset, whole[:, offset:stop]
                    streams[0].inputs.append(position, chunk)
                    for stream in streams:  # every hop of the run answers these positions
                        stream.ask(chunk.shape[1])
                    sent_at.append(time.monotonic())
                    await streams[0].send(pb.InferenceRequest(session_id=streams[0].session_id, step=pb.Step(
                        hidden=encode(chunk, self._wire_dtype), start_position=position, step_id=step_id,
                        step_positions=length, tickets=tickets,
                        rope_lengths=self.rope_lengths_for(position, position + chunk.shape[1]))))

        sender = asyncio.create_task(feed(), name="feed-run")
        try:
            decode_sized = length <= DECODE_SIZED
            previous_at: float | None = None
            pushed: Pushed = []  # what the previous hop of the run signed for this step, as it answered
            for offset, stream in enumerate(streams):
                covered = 0
                signed: Pushed = []
                while covered < length:
                    timeout = self._timeout(stream, decode_sized)
                    try:
                        result = self._answer(stream, await self._result(stream, step_id, timeout, sender),
                                              start + covered, length - covered)
                        check_on_arrival(stream, result)
                        if offset > 0:
                            check_handover(streams[offset - 1], pushed, stream, result)
                    except HopFailure as error:
                        if offset > 0:
                            _blame_pushed(first + offset, stream, error)
                        raise
                    arrived = time.monotonic()
                    position = result.start_position
                    self._check_rope(first + offset, result, pushed=offset > 0)
                    stream.keep_attestation(result.attestation, result.positions)
                    stream.reported_length = result.length
                    stream.leaving = stream.leaving or result.peer_leaving
                    is_last = offset == len(streams) - 1
                    if not is_last:
                        if result.forward_error:
                            raise ForwardBroken(first + offset, result.forward_error)
                        if not result.forwarded:
                            raise HopFailure(stream.hop, "answered with tensors instead of forwarding")
                    else:
                        if result.hidden is None:
                            raise HopFailure(stream.hop, "the last hop answered without its outputs")
                        yield position, result.hidden.tensor
                    if decode_sized:
                        reference = previous_at if previous_at is not None else (sent_at[0] if sent_at else arrived)
                        self._observe(stream, arrived - reference, result.compute_ms)
                    previous_at = arrived
                    covered += result.positions
                    signed.append((result.start_position, result.positions, result.attestation))
                pushed = signed
            await sender
        finally:
            if not sender.done():
                sender.cancel()
            elif not sender.cancelled():
                sender.exception()  # retrieved: it was either raised above or superseded by another failure

    def _answer(self, stream: HopStream, result: pb.StepResult, expected_start: int, remaining: int) -> StepAnswer:
        """A hop's result checked against what this client asked (``StepAnswer.from_proto``); else its failure."""
        try:
            return StepAnswer.from_proto(result, expected_start=expected_start, remaining=remaining,
                                         batch=self.batch_size, width=self.swarm.hidden_size,
                                         wire_dtype=self._wire_dtype)
        except BadAnswerError as error:
            raise HopFailure(stream.hop, str(error)) from error

    async def _result(self, stream: HopStream, step_id: int, timeout: float,
                      sender: asyncio.Task[None] | None = None) -> pb.StepResult:
        """The next result of this attempt from ``stream`` (stale ones skipped); fails fast if sending failed."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.001, deadline - time.monotonic())
            if sender is None or sender.done():
                if sender is not None and sender.exception() is not None:
                    raise sender.exception()  # type: ignore[misc]
                response = await stream.answer(remaining)
            else:
                answer = asyncio.ensure_future(stream.answer(remaining))
                try:
                    await asyncio.wait({answer, sender}, return_when=asyncio.FIRST_COMPLETED)
                    if not answer.done():
                        continue  # the sender finished (or failed): check it on the next round
                    response = answer.result()
                finally:
                    if not answer.done():
                        answer.cancel()
            kind = response.WhichOneof("kind")
            if kind == "push_refused" and stream.receives_push and response.push_refused.step_id >= step_id:
                # Its previous hop pushed what it may not (a made-up step among others): unlinked at once
                # (``_blame_pushed``), not waited out; an older refusal is of an attempt already abandoned.
                raise HopFailure(stream.hop, f"refused its previous hop's push: {response.push_refused.reason[:200]}")
            if kind != "result":
                continue  # e.g. a late relink acknowledgement
            if response.result.step_id != step_id:
                continue  # an answer to an abandoned attempt
            return response.result

    def _check_rope(self, index: int, result: StepAnswer, pushed: bool) -> None:
        """A length-dependent rope's result must have been computed with this client's call lengths.

        Its attestation names the lengths used. Wrong ones on a hop the client fed itself are that
        peer's fault; on a hop fed by the previous one, either may have lied: the pair is unlinked
        (the client carries it from then on, sending the lengths itself) and nobody is accused.
        """
        if not self.swarm.rope_by_length:
            return
        position = result.start_position
        if result.attestation.rope_sha256 == rope_digest(self.rope_lengths[position : position + result.positions]):
            return
        if pushed:
            raise ForwardBroken(index - 1, "the next hop computed with other rope lengths than this client's")
        raise HopFailure(self.hops[index].hop, "computed with other rope lengths than it was sent")

    def _timeout(self, stream: HopStream, decode_sized: bool) -> float:
        if decode_sized and stream.step_ema_s is not None:  # never past a whole step's (one slow step measured)
            return min(self.config.step_timeout_s, max(self.config.decode_timeout_floor_s,
                                                       self.config.decode_timeout_factor * stream.step_ema_s))
        return self.config.step_timeout_s

    def _observe(self, stream: HopStream, elapsed: float, compute_ms: float) -> None:
        stream.step_ema_s = elapsed if stream.step_ema_s is None else 0.8 * stream.step_ema_s + 0.2 * elapsed
        hop = stream.hop  # what the route finder will know of this peer next time
        self.swarm.latency.observe_step(hop.peer, hop.end - hop.start, elapsed * 1000, compute_ms)

    async def close(self) -> None:
        for hook in self.close_hooks:
            try:
                await hook()
            except Exception:
                logger.exception("a session close hook failed")
        await asyncio.gather(*(stream.close() for stream in self.hops), return_exceptions=True)
        self.hops.clear()


def _blame_pushed(index: int, stream: HopStream, failure: HopFailure) -> None:
    """A hop fed by its upstream's push failed: the push, not the hop, may be what went wrong.

    Its upstream said it forwarded every position of the step (it was read first), but one that
    never pushes, or pushes other positions, leaves an honest hop timing out or answering what it
    was given. So the pair is unlinked (``ForwardBroken``) and the step retried client-driven: only
    a hop that then fails on input this client fed it is banned. A signed lie of its own, a hop that
    is leaving, or a failure of the run's sender (the first hop's) stay what they are.
    """
    if failure.lied or failure.leaving or failure.hop != stream.hop:
        return
    reason = f"the next hop failed on what its upstream said it forwarded: {failure.reason}"
    raise ForwardBroken(index - 1, reason, suspect=stream.hop) from failure


async def _buffered(source: AsyncIterator[tuple[int, torch.Tensor]]) -> AsyncIterator[tuple[int, torch.Tensor]]:
    """All of ``source`` as one chunk: a run's whole output goes on only once it is complete."""
    pieces = [(position, chunk) async for position, chunk in source]
    if pieces:
        yield pieces[0][0], torch.cat([chunk for _, chunk in pieces], dim=1)


__all__ = ["FailoverEvent", "HopFailure", "InferenceSession", "InvalidTensorError", "RecoveryExhaustedError"]
