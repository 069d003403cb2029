"""The delay proxy adds the latency and bandwidth limit it is given, keeps order, and passes EOF on."""

from __future__ import annotations

import asyncio
import time

from brigade.deploy.delay_proxy import DelayProxy, LinkProfile


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def test_round_trip_latency_order_and_eof() -> None:
    async def scenario() -> None:
        server = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        proxy = DelayProxy("127.0.0.1", port, LinkProfile(delay_ms=30, jitter_ms=5), seed=1)
        await proxy.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.listen_port)
            began = time.perf_counter()
            writer.write(b"ping")
            await writer.drain()
            assert await reader.readexactly(4) == b"ping"
            elapsed = time.perf_counter() - began
            assert 0.060 <= elapsed < 0.5, elapsed  # 30 ms each way, plus jitter

            payload = bytes(range(256)) * 400  # many chunks: jitter must not reorder them
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(len(payload)) == payload
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 2.0) == b""
            writer.close()
        finally:
            await proxy.close()
            server.close()

    asyncio.run(scenario())


def test_bandwidth_cap_paces_a_transfer() -> None:
    async def scenario() -> None:
        server = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        proxy = DelayProxy("127.0.0.1", port, LinkProfile(bandwidth_bps=8_000_000))  # 1 MB/s
        await proxy.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.listen_port)
            payload = b"x" * 300_000
            began = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            await reader.readexactly(len(payload))
            elapsed = time.perf_counter() - began
            assert elapsed >= 0.25, elapsed  # 0.3 s per direction at 1 MB/s, pipelined both ways
            writer.close()
        finally:
            await proxy.close()
            server.close()

    asyncio.run(scenario())
