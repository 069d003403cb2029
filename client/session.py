"""An inference session through the swarm, surviving peers that crash, hang or leave.

Each hop of the route is one gRPC stream holding its span's KV cache. The client keeps, per hop,
every input it sent. When a hop fails (connection lost, deadline passed, error status, a wrong
answer) its peer is banned with backoff, a new chain of peers is found for exactly that hop's
layers, the kept inputs are replayed there as one prefill to rebuild the cache, and the step goes
on: the caller sees the same tokens as if nothing had happened. A peer that says it is leaving
is moved away from the same way, without a ban.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

import grpc
import torch

from brigade.client.bans import PeerBans
from brigade.client.remote import RemoteSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import (
    BrigadeError,
    InvalidRequestError,
    InvalidTensorError,
    MissingLayersError,
    PeerLeavingError,
    SessionLengthError,
    from_status,
)
from brigade.protocol.tensors import WIRE_DTYPES, decode, encode
from brigade.routing.route import Hop

logger = logging.getLogger(__name__)

# Steps of at most this many positions are "decode-sized": their deadline follows measured step times.
DECODE_SIZED = 8
# Errors that say the request itself is wrong: another peer would refuse it too, so no retry.
FATAL = (InvalidRequestError, SessionLengthError)


class HopFailure(Exception):
    """A hop did not answer a step or an open correctly; its peer should be avoided."""

    def __init__(self, hop: Hop, reason: str, leaving: bool = False):
        super().__init__(f"peer {hop.peer.peer_id} ({hop.peer.address}, layers {hop.start}:{hop.end}): {reason}")
        self.hop = hop
        self.reason = reason
        self.leaving = leaving  # the peer is draining: avoid it, but it did nothing wrong


class RecoveryExhaustedError(BrigadeError):
    """A step could not recover from failed hops within the retry budget."""


@dataclass
class FailoverEvent:
    """One recovery, for logs, tests and benchmarks."""

    kind: str  # "failure" (peer banned) or "migration" (peer leaving, no ban)
    peer_id: str
    layers: tuple[int, int]
    reason: str
    detected_after_s: float  # from sending the failed request to noticing; 0 for migrations
    recovery_s: float = 0.0  # re-routing, opening and replaying
    replayed_positions: int = 0
    new_route: list[str] = field(default_factory=list)


@dataclass
class HopStream:
    """One hop's open stream and every input it has been sent (what a replacement replays)."""

    hop: Hop
    session_id: str
    call: grpc.aio.StreamStreamCall
    history: list[torch.Tensor] = field(default_factory=list)
    step_ema_s: float | None = None  # typical duration of a decode-sized step on this hop
    leaving: bool = False

    def replay_input(self) -> torch.Tensor | None:
        return torch.cat(self.history, dim=1) if self.history else None


class _Budget:
    """How much recovering one step may still do."""

    def __init__(self, seconds: float, attempts: int):
        self.deadline = time.monotonic() + seconds
        self.attempts_left = attempts

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def spend(self, error: Exception) -> None:
        self.attempts_left -= 1
        if self.attempts_left < 0 or self.remaining_s() <= 0:
            raise RecoveryExhaustedError(f"gave up after repeated failures; last: {error}") from error


class InferenceSession:
    """Steps hidden states through every hop of a route, keeping each hop's cache in step."""

    def __init__(
        self, swarm: RemoteSwarm, bans: PeerBans, batch_size: int, max_length: int, pad_lengths: list[int]
    ):
        self.swarm = swarm
        self.config = swarm.config
        self.bans = bans
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_lengths = pad_lengths
        self.position = 0
        self.hops: list[HopStream] = []
        self.events: list[FailoverEvent] = []
        self._leaving: set[str] = set()  # peers that said they are draining
        self._wire_dtype = WIRE_DTYPES[self.config.wire_dtype]
        self._step_id = 0

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.hops]

    async def open(self) -> None:
        budget = _Budget(self.config.retry_budget_s, self.config.max_attempts)
        self.hops = await self._build_with_retries(0, self.swarm.num_layers, None, budget)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs [B, T, H] new positions through the route; returns the last hop's [B, T, H]."""
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session of max_length {self.max_length} cannot take {hidden.shape[1]} more positions")
        budget = _Budget(self.config.retry_budget_s, self.config.max_attempts)
        index = 0
        while index < len(self.hops):
            stream = self.hops[index]
            if stream.leaving:
                layers = (stream.hop.start, stream.hop.end)
                event = FailoverEvent("migration", stream.hop.peer.peer_id, layers, "peer leaving", 0.0)
                await self._replace(index, budget, event)
                continue
            began = time.monotonic()
            try:
                output = await self._step_hop(stream, hidden, self.position)
            except HopFailure as failure:
                budget.spend(failure)
                event = self._note_failure(failure, time.monotonic() - began)
                await self._replace(index, budget, event)
                continue
            stream.history.append(hidden)
            hidden = output
            index += 1
        self.position += hidden.shape[1]
        return hidden

    # -- recovery ----------------------------------------------------------------------------
    def _note_failure(self, failure: HopFailure, detected_after_s: float) -> FailoverEvent:
        peer_id = failure.hop.peer.peer_id
        if failure.leaving:
            self._leaving.add(peer_id)
            kind = "migration"
        else:
            duration = self.bans.ban(peer_id)
            kind = "failure"
            logger.warning("%s; banned for %.0f s, rerouting layers %d:%d", failure, duration,
                           failure.hop.start, failure.hop.end)
        return FailoverEvent(kind, peer_id, (failure.hop.start, failure.hop.end), failure.reason, detected_after_s)

    async def _replace(self, index: int, budget: _Budget, event: FailoverEvent) -> None:
        """Swaps hop ``index`` for a new chain over the same layers, its cache rebuilt by replay."""
        old = self.hops[index]
        began = time.monotonic()
        if event.kind == "migration":
            self._leaving.add(old.hop.peer.peer_id)
        history = old.replay_input()
        replacement = await self._build_with_retries(old.hop.start, old.hop.end, history, budget)
        self.hops[index : index + 1] = replacement
        old.call.cancel()
        event.recovery_s = time.monotonic() - began
        event.replayed_positions = 0 if history is None else history.shape[1]
        event.new_route = [f"{s.hop.peer.peer_id}[{s.hop.start}:{s.hop.end}]" for s in replacement]
        self.events.append(event)
        logger.info("%s of %s at layers %d:%d handled in %.3f s (replayed %d positions) via %s", event.kind,
                    event.peer_id, *event.layers, event.recovery_s, event.replayed_positions, event.new_route)

    async def _build_with_retries(
        self, start: int, end: int, history: torch.Tensor | None, budget: _Budget
    ) -> list[HopStream]:
        fresh = False
        while True:
            exclude = self.bans.banned() | self._leaving
            try:
                wait_s = max(0.0, min(self.config.route_wait_s, budget.remaining_s()))
                return await self._build_chain(start, end, history, exclude, fresh, wait_s)
            except HopFailure as failure:
                budget.spend(failure)
                self.events.append(self._note_failure(failure, 0.0))
            except MissingLayersError:
                # route() already waited for coverage; give up with this error, which names the layers.
                if budget.remaining_s() <= 0:
                    raise
                await asyncio.sleep(min(0.5, budget.remaining_s()))
            fresh = True  # something changed: read the DHT again rather than a cached view

    async def _build_chain(
        self, start: int, end: int, history: torch.Tensor | None, exclude: set[str], fresh: bool, wait_s: float
    ) -> list[HopStream]:
        needed = self.batch_size * self.max_length
        replayed = 0 if history is None else history.shape[0] * history.shape[1]
        route = await self.swarm.route(
            start, end, exclude=exclude, fresh=fresh, wait_s=wait_s, cache_tokens=needed, batch_size=self.batch_size,
            prefill_tokens=replayed, decode_tokens=self.max_length - self.position, ping_unknown=history is None,
        )
        streams: list[HopStream] = []
        try:
            replay = history
            for hop in route:
                stream = await self._open_hop(hop)
                streams.append(stream)
                if replay is not None:
                    output = await self._step_hop(stream, replay, 0)
                    stream.history.append(replay)
                    replay = output
        except BaseException:
            for stream in streams:
                stream.call.cancel()
            raise
        return streams

    # -- one hop -------------------------------------------------------------------------------
    async def _open_hop(self, hop: Hop) -> HopStream:
        session_id = secrets.token_urlsafe(12)
        call = self.swarm.stub(hop.peer.address).Inference()
        opened = pb.OpenSession(
            session_id=session_id, start_layer=hop.start, end_layer=hop.end, batch_size=self.batch_size,
            max_length=self.max_length, pad_lengths=self.pad_lengths, open_timeout_s=self.config.cache_wait_s,
        )
        try:
            async with asyncio.timeout(self.config.open_timeout_s + self.config.cache_wait_s):
                await call.write(pb.InferenceRequest(open=opened))
                response = await call.read()
            if response is grpc.aio.EOF:
                raise from_status(await call.code(), await call.details() or "the peer closed the stream")
            if response.WhichOneof("kind") != "opened":
                raise HopFailure(hop, "answered an open with something else")
        except BaseException as error:
            call.cancel()
            failure = self._classify(hop, error)
            if failure is error:
                raise
            raise failure from error
        self.bans.forgive(hop.peer.peer_id)
        return HopStream(hop=hop, session_id=session_id, call=call)

    async def _step_hop(self, stream: HopStream, hidden: torch.Tensor, start_position: int) -> torch.Tensor:
        self._step_id += 1
        step_id = self._step_id
        request = pb.InferenceRequest(
            session_id=stream.session_id,
            step=pb.Step(hidden=encode(hidden, self._wire_dtype), start_position=start_position, step_id=step_id),
        )
        decode_sized = hidden.shape[1] <= DECODE_SIZED
        timeout = self.config.step_timeout_s
        if decode_sized and stream.step_ema_s is not None:
            timeout = max(self.config.decode_timeout_floor_s, self.config.decode_timeout_factor * stream.step_ema_s)
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout):  # a timer, not a task per await: this is the per-token path
                await stream.call.write(request)
                response = await stream.call.read()
            if response is grpc.aio.EOF:
                raise from_status(await stream.call.code(), await stream.call.details() or "the peer closed the stream")
            result = response.result
            output = decode(result.hidden)
            if output.shape != hidden.shape or output.dtype != self._wire_dtype or result.step_id != step_id:
                raise InvalidTensorError(
                    f"answered shape {list(output.shape)} {output.dtype} (step {result.step_id}) for a step of "
                    f"shape {list(hidden.shape)} {self._wire_dtype} (step {step_id})"
                )
        except BaseException as error:
            stream.call.cancel()
            failure = self._classify(stream.hop, error, timeout)
            if failure is error:
                raise
            raise failure from error
        if decode_sized:
            elapsed = time.monotonic() - began
            stream.step_ema_s = elapsed if stream.step_ema_s is None else 0.8 * stream.step_ema_s + 0.2 * elapsed
            hop = stream.hop  # what the route finder will know of this peer next time
            self.swarm.latency.observe_step(hop.peer, hop.end - hop.start, elapsed * 1000, result.compute_ms)
        stream.leaving = stream.leaving or result.peer_leaving
        return output

    @staticmethod
    def _classify(hop: Hop, error: BaseException, timeout: float | None = None) -> BaseException:
        """Turns what went wrong talking to a hop into a HopFailure, or passes fatal errors through."""
        if isinstance(error, grpc.aio.AioRpcError):
            error = from_status(error.code(), error.details() or "")
        if isinstance(error, FATAL) or isinstance(error, HopFailure):
            return error
        if isinstance(error, PeerLeavingError):
            return HopFailure(hop, str(error), leaving=True)
        if isinstance(error, TimeoutError):
            return HopFailure(hop, f"no answer within {timeout or 0:.2f} s")
        if isinstance(error, asyncio.InvalidStateError):  # gRPC: writing to a call that already ended
            return HopFailure(hop, "the stream had already ended")
        if isinstance(error, BrigadeError | grpc.RpcError | ConnectionError | OSError):
            return HopFailure(hop, f"{type(error).__name__}: {error}")
        return error  # cancellation and programming errors propagate unchanged

    async def close(self) -> None:
        for stream in self.hops:
            try:
                async with asyncio.timeout(1.0):
                    await stream.call.done_writing()
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
                pass
            stream.call.cancel()
        self.hops.clear()
