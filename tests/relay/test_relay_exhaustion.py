"""A relay's slots cannot be used up by one party (issue 19, defect 12).

Real gRPC and TCP on loopback, in one process (as test_relay_transport.py): the relay service and
its relay port are the real code; the "relayed peers" are hand-driven tunnels, so each test can
misbehave exactly as an attacker would: never splice, never read notices, hold connections idle,
register fresh identities from one address.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from brigade.peer.relay import RELAY_PURPOSE, RelayLimits, RelayListener, RelayService
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_options import grpc_options
from brigade.protocol.channels import relay_target
from brigade.protocol.identity import Identity
from brigade.protocol.tokens import make_token

pytestmark = pytest.mark.timeout(60)


@dataclass
class Relay:
    identity: Identity
    service: RelayService
    server: grpc.aio.Server
    listener: RelayListener
    channel: grpc.aio.Channel

    async def register(self, identity: Identity) -> grpc.aio.StreamStreamCall:
        """A tunnel registered for ``identity`` (raises the refusal's AioRpcError)."""
        call = pb_grpc.RelayStub(self.channel).Tunnel()
        await call.write(pb.RelayControl(register=pb.RelayRegister(
            token=make_token(identity, self.identity.peer_id, RELAY_PURPOSE))))
        notice = await asyncio.wait_for(call.read(), 5)
        if notice is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(await call.code(), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       await call.details())
        assert notice.WhichOneof("kind") == "registered"
        return call

    async def connect(self, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.listener.bound_port)
        writer.write(f"CONNECT {relay_target(peer_id)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        return reader, writer


@contextlib.asynccontextmanager
async def relay(limits: RelayLimits, **options: object) -> AsyncIterator[Relay]:
    identity = Identity.generate()
    listener_box: list[RelayListener] = []
    service = RelayService(identity.peer_id, lambda: f"127.0.0.1:{listener_box[0].bound_port}", limits,
                           **options)  # type: ignore[arg-type]
    server = grpc.aio.server(options=grpc_options(1 << 20))
    pb_grpc.add_RelayServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    listener = RelayListener(service, "127.0.0.1", 0)
    listener_box.append(listener)
    await listener.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Relay(identity, service, server, listener, channel)
    finally:
        await channel.close()
        await listener.close()
        await server.stop(0)


def run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 30))  # type: ignore[arg-type]


async def answer(reader: asyncio.StreamReader, timeout_s: float = 1.0) -> bytes:
    return await asyncio.wait_for(reader.read(200), timeout_s)


def test_an_idle_relayed_connection_is_closed() -> None:
    async def scenario() -> None:
        async with relay(RelayLimits(idle_timeout_s=0.5)) as node:
            peer = Identity.generate()
            tunnel = await node.register(peer)
            reader, writer = await node.connect(peer.peer_id)
            incoming = await asyncio.wait_for(tunnel.read(), 5)
            splice = pb_grpc.RelayStub(node.channel).Splice()
            await splice.write(pb.RelayChunk(connection_id=incoming.incoming.connection_id))
            assert (await answer(reader, 5)).startswith(b"HTTP/1.1 200")
            began = time.monotonic()
            assert await answer(reader, 5) == b""  # both sides silent: the relay ends the connection
            assert time.monotonic() - began < 3.0
            assert node.service.connections == 0
            writer.close()
            splice.cancel()
            tunnel.cancel()

    run(scenario())


def test_one_source_cannot_take_every_connection() -> None:
    async def scenario() -> None:
        limits = RelayLimits(max_connections_per_source=2, splice_timeout_s=5.0)
        async with relay(limits) as node:
            peer = Identity.generate()
            tunnel = await node.register(peer)
            held = [await node.connect(peer.peer_id) for _ in range(2)]  # never spliced: they wait
            await asyncio.sleep(0.2)
            reader, writer = await node.connect(peer.peer_id)
            assert (await answer(reader)).startswith(b"HTTP/1.1 503")
            assert node.service.connections == 2
            for _, held_writer in held:
                held_writer.close()
            writer.close()
            tunnel.cancel()

    run(scenario())


def test_fresh_identities_from_one_source_take_only_its_share_of_registrations() -> None:
    async def scenario() -> None:
        async with relay(RelayLimits(max_peers=16, max_peers_per_source=2)) as node:
            tunnels = [await node.register(Identity.generate()) for _ in range(2)]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await node.register(Identity.generate())
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(node.service.peers) == 2
            tunnels[0].cancel()  # a slot freed is a slot to take
            async with asyncio.timeout(5):
                while len(node.service.peers) > 1:
                    await asyncio.sleep(0.02)
            tunnels.append(await node.register(Identity.generate()))
            for tunnel in tunnels:
                tunnel.cancel()

    run(scenario())


def test_the_peer_filter_decides_who_may_register() -> None:
    blocked = Identity.generate()

    async def scenario() -> None:
        async with relay(RelayLimits(), admits=lambda peer_id: peer_id != blocked.peer_id) as node:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await node.register(blocked)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            (await node.register(Identity.generate())).cancel()

    run(scenario())


class _StuckQueue(asyncio.Queue):  # type: ignore[type-arg]
    """A tunnel whose writes are blocked (the relayed peer stopped reading): notices stay queued
    until the end marker, which is what a full HTTP/2 window does to the relay's notice loop."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize)
        self._ended = asyncio.Event()

    def put_nowait(self, item: object) -> None:
        super().put_nowait(item)
        if item is None:
            self._ended.set()

    async def get(self) -> object:
        await self._ended.wait()
        return None


def test_a_full_notice_queue_is_refused_cleanly_and_the_tunnel_still_ends() -> None:
    async def scenario() -> None:
        async with relay(RelayLimits(max_connections_per_peer=4)) as node:
            peer = Identity.generate()
            tunnel = await node.register(peer)
            registration = node.service.peers[peer.peer_id]
            waiting = registration.notices
            registration.notices = _StuckQueue(waiting.maxsize)
            waiting.put_nowait(pb.RelayNotice())  # the loop takes it, then waits on the stuck queue
            await asyncio.wait_for(tunnel.read(), 5)
            while not registration.notices.full():
                registration.notices.put_nowait(pb.RelayNotice())
            reader, writer = await node.connect(peer.peer_id)
            assert (await answer(reader)).startswith(b"HTTP/1.1 503")
            assert node.service.connections == 0
            writer.close()
            tunnel.cancel()
            async with asyncio.timeout(5):
                while node.service.peers:
                    await asyncio.sleep(0.02)
            assert registration.ended

    run(scenario())
