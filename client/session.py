"""An inference session through the swarm: one gRPC stream per hop, each holding its span's cache.

The client keeps, per hop, every input it sent: that is what a replacement peer needs to rebuild
its cache by replay when a hop fails (the failover loop builds on this).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

import grpc
import torch

from brigade.client.remote import RemoteSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import BrigadeError, InvalidTensorError, from_status
from brigade.protocol.tensors import WIRE_DTYPES, decode, encode
from brigade.routing.route import Hop

logger = logging.getLogger(__name__)


@dataclass
class HopStream:
    """One hop's open stream and the inputs it has been sent (for replay)."""

    hop: Hop
    session_id: str
    call: grpc.aio.StreamStreamCall
    history: list[torch.Tensor] = field(default_factory=list)


class InferenceSession:
    """Steps hidden states through every hop of a route, keeping each hop's cache in step."""

    def __init__(self, swarm: RemoteSwarm, batch_size: int, max_length: int, pad_lengths: list[int]):
        self.swarm = swarm
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_lengths = pad_lengths
        self.position = 0
        self.hops: list[HopStream] = []
        self._wire_dtype = WIRE_DTYPES[swarm.config.wire_dtype]
        self._step_id = 0

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.hops]

    async def open(self) -> None:
        route = await self.swarm.route(0, self.swarm.num_layers)
        try:
            for hop in route:
                self.hops.append(await self._open_hop(hop))
        except BaseException:
            await self.close()
            raise

    async def _open_hop(self, hop: Hop) -> HopStream:
        session_id = secrets.token_urlsafe(12)
        call = self.swarm.stub(hop.peer.address).Inference()
        opened = pb.OpenSession(
            session_id=session_id,
            start_layer=hop.start,
            end_layer=hop.end,
            batch_size=self.batch_size,
            max_length=self.max_length,
            pad_lengths=self.pad_lengths,
        )
        try:
            await asyncio.wait_for(call.write(pb.InferenceRequest(open=opened)), self.swarm.config.open_timeout_s)
            response = await asyncio.wait_for(call.read(), self.swarm.config.open_timeout_s)
        except grpc.aio.AioRpcError as error:
            call.cancel()
            raise from_status(error.code(), error.details() or "") from error
        except BaseException:
            call.cancel()
            raise
        if response is grpc.aio.EOF or response.WhichOneof("kind") != "opened":
            call.cancel()
            raise BrigadeError(f"peer {hop.peer.peer_id} at {hop.peer.address} did not open the session")
        return HopStream(hop=hop, session_id=session_id, call=call)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs [B, T, H] new positions through the route; returns the last hop's [B, T, H]."""
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session of max_length {self.max_length} cannot take {hidden.shape[1]} more positions")
        for stream in self.hops:
            output = await self._step_hop(stream, hidden)
            stream.history.append(hidden)
            hidden = output
        self.position += hidden.shape[1]
        return hidden

    async def _step_hop(self, stream: HopStream, hidden: torch.Tensor) -> torch.Tensor:
        self._step_id += 1
        request = pb.InferenceRequest(
            session_id=stream.session_id,
            step=pb.Step(hidden=encode(hidden, self._wire_dtype), start_position=self.position, step_id=self._step_id),
        )
        timeout = self.swarm.config.step_timeout_s
        try:
            async with asyncio.timeout(timeout):  # a timer, not a task per await: this is the per-token path
                await stream.call.write(request)
                response = await stream.call.read()
        except grpc.aio.AioRpcError as error:
            raise from_status(error.code(), error.details() or "") from error
        if response is grpc.aio.EOF:
            status = await stream.call.code()
            raise from_status(status, await stream.call.details() or "the peer closed the stream")
        result = response.result
        output = decode(result.hidden)
        if output.shape != hidden.shape or result.step_id != self._step_id:
            raise InvalidTensorError(
                f"peer {stream.hop.peer.peer_id} answered shape {list(output.shape)} "
                f"for a step of shape {list(hidden.shape)}"
            )
        return output

    async def close(self) -> None:
        for stream in self.hops:
            try:
                await asyncio.wait_for(stream.call.done_writing(), 1.0)
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
                pass
            stream.call.cancel()
        self.hops.clear()
