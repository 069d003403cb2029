"""The channel cache never closes a channel that still carries a call.

A live session's stream is opened once; its channel is not asked for again, so by recency alone it
is the first to be evicted. Here a real grpc.aio echo server on 127.0.0.1 carries a stream opened
through a cached channel; then many more channels than the cache's limit are asked for (records a
sybil rotates, next-hop ids), and after the eviction grace the stream still answers. The idle
channels evicted meanwhile are closed, and the cache stays at its limit plus the one busy channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from brigade.protocol.channel_cache import ChannelCache, DialKey

pytestmark = pytest.mark.timeout(60)

GRACE_S = 0.2
LIMIT = 4


async def _echo(requests: AsyncIterator[bytes], _context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _ping(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    return b"pong"


async def _server() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Chat": grpc.stream_stream_rpc_method_handler(_echo),
        "Ping": grpc.unary_unary_rpc_method_handler(_ping),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _key(index: int, address: str) -> DialKey:
    return DialKey(f"peer-{index}", address, "", "", "")


def test_a_channel_with_a_live_stream_outlives_eviction() -> None:
    async def scenario() -> None:
        server, address = await _server()
        cache = ChannelCache(LIMIT, evict_grace_s=GRACE_S)
        made: list[grpc.aio.Channel] = []

        def dial() -> grpc.aio.Channel:
            made.append(grpc.aio.insecure_channel(address))
            return made[-1]

        try:
            live = cache.get(_key(0, address), dial)
            stream = live.stream_stream("/test.Echo/Chat")()
            await stream.write(b"hello")
            assert await stream.read() == b"hello"
            for index in range(1, 4 * LIMIT):  # each pinged once, as a client pings new records
                channel = cache.get(_key(index, address), dial)
                assert await channel.unary_unary("/test.Echo/Ping")(b"ping", timeout=10) == b"pong"
            await asyncio.sleep(3 * GRACE_S)
            await stream.write(b"still there")
            assert await asyncio.wait_for(stream.read(), 10) == b"still there"
            assert live.busy and made[0].get_state() != grpc.ChannelConnectivity.SHUTDOWN
            assert len(cache) <= LIMIT + 1  # the limit, and the busy channel over it
            evicted = made[1 : len(made) - LIMIT]
            assert evicted and all(channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN for channel in evicted)
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
            assert not live.busy
            cache.get(_key(100, address), dial)  # now idle and least recently used: this one goes
            await asyncio.sleep(3 * GRACE_S)
            assert made[0].get_state() == grpc.ChannelConnectivity.SHUTDOWN
            assert len(cache) == LIMIT
        finally:
            await cache.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_channel_whose_unary_call_is_in_flight_is_not_evicted() -> None:
    """A call counts from its creation to its end, unary calls too; a finished one does not hold its channel."""
    async def scenario() -> None:
        server, address = await _server()
        cache = ChannelCache(1, evict_grace_s=GRACE_S)
        try:
            first = cache.get(_key(0, address), lambda: grpc.aio.insecure_channel(address))
            call = first.unary_unary("/test.Echo/Ping")(b"ping", timeout=10)
            assert first.calls == 1
            cache.get(_key(1, address), lambda: grpc.aio.insecure_channel(address))
            assert await call == b"pong"
            await asyncio.sleep(0)
            assert first.calls == 0
            assert first.get_state() != grpc.ChannelConnectivity.SHUTDOWN
            cache.get(_key(2, address), lambda: grpc.aio.insecure_channel(address))
            await asyncio.sleep(3 * GRACE_S)
            assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        finally:
            await cache.close()
            await server.stop(None)

    asyncio.run(scenario())
