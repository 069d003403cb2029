"""The relayed peer's side: staying reachable through a relay while nothing can connect in.

An unreachable peer keeps one outbound ``Tunnel`` stream to a relay (a reachable peer that runs
``--relay``), registered with a token signed by its identity. For each client that connects to
the relay, the relay sends an ``Incoming`` notice; this side opens a ``Splice`` stream for it and a
local TCP connection to its own gRPC port, and copies bytes between the two. The client's TLS
session therefore ends here, at this peer's own server, exactly as if it had connected directly.

Before announcing a relay, the link dials itself through it (TLS pinned to its own certificate,
``Info`` must name it): a relay whose relay port clients cannot reach is never announced.

When the tunnel ends (the relay died, restarted or dropped us) the link tells its owner at once
(the peer re-announces without a relay, so clients stop dialing a dead one), then picks another
relay, avoiding the one that failed for a while, and announces the new address. Relays are
ordered by round trip from here: the relay sits on every relayed byte's path.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from brigade.peer.pings import round_trip_ms
from brigade.peer.relay import CHUNK_BYTES, RELAY_PURPOSE, first_to_end
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import dial, peer_channel
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, newest_per_peer, parse_address
from brigade.protocol.tokens import make_token

logger = logging.getLogger(__name__)

MAX_RELAY_CANDIDATES = 4  # relays measured per choice (concurrently, each bounded by ping_timeout_s)


@dataclass(frozen=True)
class RelayState:
    """Where clients reach this peer while it is relayed."""

    relay_id: str
    address: str  # "host:port" of the relay's relay port: what this peer announces


def relay_candidates(records: list[PeerRecord], self_id: str) -> list[PeerRecord]:
    """Peers that offer relaying and can be reached directly: online, not relayed themselves, newest record each."""
    newest = newest_per_peer(records)
    return [record for record in newest.values()
            if record.peer_id != self_id and record.relay_address and not record.relay_peer_id
            and record.reachable is not False and record.state == "online"]


class RelayedLink:
    """Keeps this peer registered with one relay at a time. ``run`` until cancelled."""

    def __init__(
        self,
        identity: Identity,
        tls_cert: str,
        backend: tuple[str, int],
        find_relays: Callable[[], Awaitable[list[PeerRecord]]],
        on_change: Callable[[RelayState | None], Awaitable[Any]],
        *,
        allow_insecure: bool = False,
        max_connections: int = 64,
        register_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        ping_timeout_s: float = 2.0,
        avoid_s: float = 60.0,
        retry_max_s: float = 15.0,
    ):
        """``tls_cert`` is this peer's certificate (what clients pin); ``backend`` is its own gRPC
        server (host, port) that relayed connections are handed to; ``find_relays()`` reads
        relay-capable records (from the DHT); ``on_change(state)`` is awaited whenever the relay
        changes or is lost (None). No I/O here."""
        self.identity = identity
        self.tls_cert = tls_cert
        self.backend = backend
        self._find_relays = find_relays
        self._on_change = on_change
        self.allow_insecure = allow_insecure
        self.max_connections = max_connections
        self.register_timeout_s = register_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.ping_timeout_s = ping_timeout_s
        self.avoid_s = avoid_s
        self.retry_max_s = retry_max_s
        self.current: RelayState | None = None
        self.registered = asyncio.Event()  # set while registered with a relay
        self._avoid: dict[str, float] = {}  # relay id -> monotonic time until which it is tried last
        self._splices: set[asyncio.Task[None]] = set()
        self._rng = random.Random()

    async def run(self) -> None:
        delay = 1.0
        while True:
            served = False
            for relay in await self._ordered_candidates():
                if await self._serve_via(relay):
                    served = True
                    break
            if served:
                delay = 1.0
                continue  # the relay went: pick another at once
            logger.warning("no relay accepted this peer; retrying in %.0f s", delay)
            await asyncio.sleep(delay * self._rng.uniform(0.8, 1.2))
            delay = min(delay * 2, self.retry_max_s)

    async def _ordered_candidates(self) -> list[PeerRecord]:
        """Relays to try, fastest first; ones that failed recently go last (still tried when alone)."""
        try:
            candidates = relay_candidates(await self._find_relays(), self.identity.peer_id)
        except Exception:  # a DHT hiccup: try again after the back-off
            logger.warning("reading relay records failed", exc_info=True)
            return []
        self._rng.shuffle(candidates)
        now = time.monotonic()
        fresh = [record for record in candidates if self._avoid.get(record.peer_id, 0.0) <= now]
        stale = [record for record in candidates if self._avoid.get(record.peer_id, 0.0) > now]
        measured = fresh[:MAX_RELAY_CANDIDATES]
        rtts = await asyncio.gather(*(round_trip_ms(record, self.ping_timeout_s) for record in measured))
        ranked = sorted((rtt, index) for index, rtt in enumerate(rtts) if rtt is not None)
        return [measured[index] for _, index in ranked] + fresh[MAX_RELAY_CANDIDATES:] + stale

    async def _serve_via(self, relay: PeerRecord) -> bool:
        """Registers with ``relay`` and serves its notices until the tunnel ends; True if it registered."""
        channel = peer_channel(relay, allow_insecure=self.allow_insecure)
        stub = pb_grpc.RelayStub(channel)
        registered = False
        try:
            call = stub.Tunnel()
            token = make_token(self.identity, relay.peer_id, RELAY_PURPOSE)
            async with asyncio.timeout(self.register_timeout_s):
                await call.write(pb.RelayControl(register=pb.RelayRegister(token=token)))
                notice = await call.read()
            if notice is grpc.aio.EOF or notice.WhichOneof("kind") != "registered":
                code, details = await call.code(), await call.details()
                logger.warning("relay %s refused this peer: %s %s", relay.peer_id, code, details)
                return False
            address = notice.registered.address
            if parse_address(address) is None:
                logger.warning("relay %s gave an unusable address %r", relay.peer_id, address[:100])
                call.cancel()
                return False
            notices = asyncio.create_task(self._serve_notices(call, stub), name="relay-notices")
            try:
                problem = await self._check_path(address)
                if problem:
                    logger.warning("relay %s registered this peer, but clients could not reach it at %s (%s); "
                                   "trying another relay", relay.peer_id, address, problem)
                    self._avoid[relay.peer_id] = time.monotonic() + self.avoid_s
                    return False
                registered = True
                self.current = RelayState(relay.peer_id, address)
                self.registered.set()
                logger.info("registered with relay %s: clients reach this peer at %s", relay.peer_id, address)
                await self._on_change(self.current)
                await notices
            finally:
                notices.cancel()
            logger.warning("relay %s ended the tunnel (%s); looking for another relay", relay.peer_id,
                           await call.code())
        except (grpc.aio.AioRpcError, TimeoutError, OSError, ConnectionError, asyncio.InvalidStateError) as error:
            logger.warning("tunnel to relay %s failed: %s", relay.peer_id, _describe(error))
        finally:
            for task in list(self._splices):
                task.cancel()
            await channel.close()
        if registered:  # not reached on cancellation: a stopping peer announces nothing more
            self._avoid[relay.peer_id] = time.monotonic() + self.avoid_s
            self.current = None
            self.registered.clear()
            await self._on_change(None)
        return registered

    async def _serve_notices(self, call: grpc.aio.StreamStreamCall, stub: pb_grpc.RelayStub) -> None:
        """Takes every relayed connection the relay announces, until the tunnel ends."""
        while (notice := await call.read()) is not grpc.aio.EOF:
            if notice.WhichOneof("kind") == "incoming":
                self._accept(stub, notice.incoming.connection_id)

    async def _check_path(self, address: str) -> str:
        """Dials this peer through the relay as a client would; "" when Info answers with our id, else why not."""
        try:
            channel = dial(address, self.tls_cert, allow_insecure=self.allow_insecure, relay_for=self.identity.peer_id)
        except (ConnectionError, ValueError) as error:
            return str(error)
        try:
            info = await pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=self.connect_timeout_s)
        except grpc.aio.AioRpcError as error:
            return _describe(error)
        finally:
            await channel.close()
        return "" if info.peer_id == self.identity.peer_id else f"another peer answered ({info.peer_id[:64]})"

    def _accept(self, stub: pb_grpc.RelayStub, connection_id: bytes) -> None:
        if len(self._splices) >= self.max_connections:
            logger.warning("refusing a relayed connection: %d already open", len(self._splices))
            return  # the relay gives up on it after its splice timeout and tells the client
        task = asyncio.create_task(self._splice(stub, connection_id), name="relayed-splice")
        self._splices.add(task)
        task.add_done_callback(self._splice_done)

    def _splice_done(self, task: asyncio.Task[None]) -> None:
        self._splices.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("a relayed connection ended with an error", exc_info=task.exception())

    async def _splice(self, stub: pb_grpc.RelayStub, connection_id: bytes) -> None:
        """Hands one relayed client connection to this peer's own server, byte for byte."""
        async with asyncio.timeout(self.connect_timeout_s):
            reader, writer = await asyncio.open_connection(*self.backend)
        call = stub.Splice()
        try:
            await call.write(pb.RelayChunk(connection_id=connection_id))

            async def up() -> None:  # relay -> this peer's server (the client's bytes)
                while (chunk := await call.read()) is not grpc.aio.EOF:
                    writer.write(chunk.data)
                    await writer.drain()

            async def down() -> None:  # this peer's server -> relay
                while data := await reader.read(CHUNK_BYTES):
                    await call.write(pb.RelayChunk(data=data))

            await first_to_end(up(), down())
        finally:
            call.cancel()
            writer.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return repr(error)
