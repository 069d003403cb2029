"""A TCP proxy that gives a loopback link the latency, jitter, stalls and bandwidth of a real one.

This machine's kernel has no ``netem`` qdisc, so tests, benchmarks and the testbed put one of
these in front of a peer and announce the proxy's address instead of the peer's. Each direction
of each connection is its own delay line: bytes read at time t are written at
``max(t + delay + jitter, previous delivery, link free)``, so order is kept, jitter never
reorders, and a bandwidth cap queues bytes behind each other like a real bottleneck. A stall
holds a whole direction for a while (a lost packet waiting for its retransmission, seen from
TCP above it).

Everything is bounded: bytes in flight per direction (reading pauses beyond it, which is TCP's
own back-pressure), connections per proxy, and every close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import threading
from collections import deque
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class LinkProfile:
    """One direction's behaviour; a proxy applies it to both directions of every connection."""

    delay_ms: float = 0.0  # one-way delay added to every byte
    jitter_ms: float = 0.0  # plus a uniform random [0, jitter_ms) per chunk (order is kept)
    bandwidth_bps: float | None = None  # bits per second through this direction; None = unlimited
    stall_rate_per_s: float = 0.0  # expected stalls per second of traffic (Poisson)
    stall_ms: float = 0.0  # how long a stall holds the direction
    max_in_flight_bytes: int = 16 * 1024 * 1024  # reading pauses while this much waits for delivery


@dataclass
class _DelayLine:
    """Bytes waiting for their delivery time in one direction of one connection."""

    profile: LinkProfile
    rng: random.Random
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    in_flight: int = 0
    last_delivery: float = 0.0
    link_free_at: float = 0.0
    stall_until: float = 0.0
    last_check: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def schedule(self, data: bytes, now: float) -> None:
        profile = self.profile
        if profile.stall_rate_per_s > 0:
            elapsed = 0.0 if self.last_check is None else now - self.last_check
            self.last_check = now
            if self.rng.random() < 1 - math.exp(-profile.stall_rate_per_s * elapsed):  # Poisson arrivals
                self.stall_until = max(self.stall_until, now + profile.stall_ms / 1000)
        due = now + profile.delay_ms / 1000
        if profile.jitter_ms > 0:
            due += self.rng.uniform(0, profile.jitter_ms / 1000)
        if profile.bandwidth_bps:
            start = max(now, self.link_free_at)
            self.link_free_at = start + len(data) * 8 / profile.bandwidth_bps
            due = max(due, self.link_free_at + profile.delay_ms / 1000)
        due = max(due, self.last_delivery, self.stall_until)
        self.last_delivery = due
        self.queue.append((due, data))
        self.in_flight += len(data)
        self.changed.set()


class DelayProxy:
    """Listens on ``listen_host:listen_port`` and forwards every connection to ``target``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        profile: LinkProfile,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        max_connections: int = 256,
        seed: int | None = None,
    ):
        self.target = (target_host, target_port)
        self.profile = profile
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.max_connections = max_connections
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.bytes_forwarded = 0

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            client_writer.close()
            return
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), timeout=10.0
            )
        except (OSError, TimeoutError) as error:
            logger.debug("proxy %s could not reach %s: %r", self.address, self.target, error)
            client_writer.close()
            self._tasks.discard(task)
            return
        for writer in (client_writer, upstream_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(client_reader, upstream_writer))
                group.create_task(self._pipe(upstream_reader, client_writer))
        except* (ConnectionError, OSError):
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copies one direction through a delay line; closes the far side's write half at EOF."""
        line = _DelayLine(self.profile, random.Random(self._rng.random()))
        loop = asyncio.get_running_loop()
        eof = asyncio.Event()

        async def deliver() -> None:
            while True:
                if not line.queue:
                    if eof.is_set():
                        return
                    line.changed.clear()
                    await line.changed.wait()
                    continue
                due, data = line.queue[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                line.queue.popleft()
                writer.write(data)
                await writer.drain()
                line.in_flight -= len(data)
                self.bytes_forwarded += len(data)
                line.changed.set()

        delivery = asyncio.create_task(deliver())
        try:
            while True:
                while line.in_flight >= self.profile.max_in_flight_bytes:
                    line.changed.clear()
                    await line.changed.wait()
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                line.schedule(data, loop.time())
            eof.set()
            line.changed.set()
            await delivery
            if writer.can_write_eof():
                writer.write_eof()
        finally:
            delivery.cancel()


class ProxyThread:
    """A ``DelayProxy`` on its own event loop thread, for synchronous tests and scripts."""

    def __init__(self, target: str, profile: LinkProfile, *, listen_host: str = "127.0.0.1", seed: int | None = None):
        host, port = target.rsplit(":", 1)
        self.proxy = DelayProxy(host, int(port), profile, listen_host=listen_host, seed=seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)

    @property
    def address(self) -> str:
        return self.proxy.address

    def start(self) -> ProxyThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10.0)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """``python -m brigade.deploy.delay_proxy TARGET --delay-ms 25``: one proxy until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth-mbps", type=float, default=None)
    parser.add_argument("--stall-rate", type=float, default=0.0, help="stalls per second")
    parser.add_argument("--stall-ms", type=float, default=0.0)
    options = parser.parse_args()
    listen_host, listen_port = options.listen.rsplit(":", 1)
    host, port = options.target.rsplit(":", 1)
    profile = LinkProfile(
        delay_ms=options.delay_ms, jitter_ms=options.jitter_ms,
        bandwidth_bps=options.bandwidth_mbps * 1e6 if options.bandwidth_mbps else None,
        stall_rate_per_s=options.stall_rate, stall_ms=options.stall_ms,
    )

    async def run() -> None:
        proxy = DelayProxy(host, int(port), profile, listen_host=listen_host, listen_port=int(listen_port))
        await proxy.start()
        print(f"BRIGADE_PROXY_READY {proxy.address}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await proxy.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()

