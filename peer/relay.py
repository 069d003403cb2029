"""The relay side: carrying client connections to peers that cannot accept any (docs/relays.md).

A reachable peer started with ``--relay`` offers this. An unreachable peer registers on a
``Tunnel`` stream (a token signed by its identity, addressed to this relay); a client that wants
it connects to this relay's relay port and sends an HTTP CONNECT naming it (gRPC does this itself
when a channel has a proxy: ``protocol/channels.py``). The relay tells the relayed peer on its
tunnel, the relayed peer opens a ``Splice`` stream naming the connection, the relay answers the
client "200", and from then on copies bytes both ways.

What it copies is the client's TLS session with the relayed peer, pinned to the certificate in
the relayed peer's signed record: the relay holds no key, so it sees neither tensors nor tokens,
and cannot change a byte without breaking the session. It can only drop or delay traffic, which
the client treats like any failed hop.

Bounds (``peer/relay_limits.py``): the CONNECT preamble (size and time), the wait for the relayed
peer's Splice, one read of at most ``CHUNK_BYTES`` in flight per direction, an idle timeout on
every carried connection, and the volunteer's caps: relayed peers (in all and per source IP, and
only identities the peer filter admits), connections (in all, per relayed peer and per client
source IP), and bytes per relayed peer per hour. A relayed peer that does not take its notices is
dropped, and a connection whose notice cannot be queued is refused with 503, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from brigade.peer.reachability import observed_host
from brigade.peer.relay_limits import ByteBudget, RelayLimits, SourceCounts
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import relayed_peer_of
from brigade.protocol.errors import InvalidTokenError
from brigade.protocol.tokens import TokenVerifier

logger = logging.getLogger(__name__)

RELAY_PURPOSE = "relay"  # token purpose of a registration
CHUNK_BYTES = 64 * 1024  # one read from a client connection: the most a direction holds in flight
PREAMBLE_MAX_BYTES = 4096  # a CONNECT request line and its headers; gRPC sends about 120 bytes
CONNECTION_ID_BYTES = 16
Tap = Callable[[str, bytes], None]  # (direction "up" = client to peer | "down", bytes) for tests and metrics


_ByteBudget = ByteBudget  # the name tests and older callers use


@dataclass(eq=False)
class _Connection:
    """One client connection carried for a relayed peer."""

    peer_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    source: str  # the client's IP
    attached: asyncio.Event = field(default_factory=asyncio.Event)  # the relayed peer's Splice arrived
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the splice ended (either side)


@dataclass(eq=False)
class _Registration:
    """A relayed peer's tunnel: where Incoming notices go."""

    peer_id: str
    source: str  # the IP the tunnel came from
    budget: ByteBudget
    notices: asyncio.Queue[pb.RelayNotice | None]  # None ends the tunnel; bounded by the connection cap
    connections: set[_Connection] = field(default_factory=set)
    ended: bool = False

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            while not self.notices.empty():  # room for the end marker: pending notices die with the tunnel
                self.notices.get_nowait()
            self.notices.put_nowait(None)
        for connection in list(self.connections):
            connection.writer.close()
            connection.attached.set()  # a connection still waiting for its Splice gives up at once
            connection.done.set()


class RelayService(pb_grpc.RelayServicer):
    """Registrations (gRPC ``Tunnel``), spliced streams (``Splice``) and the relay port's CONNECTs."""

    def __init__(self, relay_id: str, public_address: Callable[[], str], limits: RelayLimits | None = None, *,
                 tap: Tap | None = None, clock: Callable[[], float] = time.time,
                 admits: Callable[[str], bool] = lambda _: True):
        """``public_address()`` is the "host:port" clients dial for this relay's relay port (known
        once the listener is bound). ``tap`` sees every forwarded chunk. ``admits(peer_id)`` is the
        peer filter: only identities it admits may register. No I/O here."""
        self.relay_id = relay_id
        self.limits = limits or RelayLimits()
        self._public_address = public_address
        self._tap = tap
        self._clock = clock
        self.tokens = TokenVerifier(relay_id)
        self._admits = admits
        self._peers_per_source = SourceCounts(self.limits.max_peers_per_source)
        self._connections_per_source = SourceCounts(self.limits.max_connections_per_source)
        self.peers: dict[str, _Registration] = {}
        self._pending: dict[bytes, _Connection] = {}
        self.connections = 0
        self.bytes_forwarded = 0

    # -- registrations ---------------------------------------------------------------------------
    async def Tunnel(self, request_iterator: AsyncIterator[pb.RelayControl],
                     context: grpc.aio.ServicerContext) -> None:
        try:
            async with asyncio.timeout(self.limits.register_timeout_s):
                first = await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "register first on a relay tunnel")
            return
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a relay tunnel starts with register")
            return
        try:
            token = first.register.token if first.register.HasField("token") else None
            peer_id = self.tokens.verify(token, RELAY_PURPOSE)
        except InvalidTokenError as error:
            await context.abort(error.status, str(error))
            return
        if not self._admits(peer_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this relay's peer filter does not admit you")
            return
        source = observed_host(context.peer()) or "?"
        held = self.peers.get(peer_id)
        if held is None and len(self.peers) >= self.limits.max_peers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this relay carries {len(self.peers)} peers, its limit; try another relay")
            return
        if held is not None:  # the same peer again (it reconnected): the newest tunnel wins
            held.end()
            if self.peers.get(peer_id) is held:
                del self.peers[peer_id]
                self._peers_per_source.give_back(held.source)
        if not self._peers_per_source.take(source):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "this relay carries all the peers it allows from your address; try another relay")
            return
        registration = _Registration(peer_id, source, ByteBudget(self.limits.max_bytes_per_hour, self._clock),
                                     asyncio.Queue(maxsize=self.limits.max_connections_per_peer + 1))
        self.peers[peer_id] = registration
        watcher = asyncio.ensure_future(context.read())  # the peer sends nothing more: EOF or error = it left
        watcher.add_done_callback(lambda _: registration.end())
        try:
            await context.write(pb.RelayNotice(registered=pb.RelayRegistered(
                address=self._public_address(), max_connections=self.limits.max_connections_per_peer,
                max_bytes_per_hour=max(0, self.limits.max_bytes_per_hour))))
            logger.info("relaying for %s (%d peers relayed here)", peer_id, len(self.peers))
            while (notice := await registration.notices.get()) is not None:
                async with asyncio.timeout(self.limits.notice_timeout_s):  # a peer that stops reading is dropped
                    await context.write(notice)
        except TimeoutError:
            logger.warning("relayed peer %s does not take its notices; dropping it", peer_id)
        finally:
            watcher.cancel()
            registration.end()
            if self.peers.get(peer_id) is registration:
                del self.peers[peer_id]
                self._peers_per_source.give_back(source)
            logger.info("stopped relaying for %s", peer_id)

    # -- one client connection: CONNECT, then the relayed peer's Splice ----------------------------
    async def handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The relay port's connection handler (``asyncio.start_server``)."""
        try:
            await self._serve_client(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as error:
            logger.debug("relayed connection ended: %r", error)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.limits.preamble_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return await _respond(writer, 408, "send a CONNECT request first")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            return await _respond(writer, 400, "not a CONNECT request")
        if len(head) > PREAMBLE_MAX_BYTES:
            return await _respond(writer, 431, "CONNECT request too long")
        peer_id = parse_connect(head)
        if peer_id is None:
            return await _respond(writer, 400, "expected CONNECT <peer id>.relayed.brigade.invalid:443")
        registration = self.peers.get(peer_id)
        if registration is None or registration.ended:
            return await _respond(writer, 404, f"{peer_id} is not relayed here")
        if self.connections >= self.limits.max_connections:
            return await _respond(writer, 503, "this relay carries all the connections it allows")
        if len(registration.connections) >= self.limits.max_connections_per_peer:
            return await _respond(writer, 503, f"this relay carries all the connections it allows for {peer_id}")
        if registration.budget.exhausted():
            return await _respond(writer, 429, f"{peer_id} used this relay's byte budget for this hour")
        source = _source_of(writer)
        if not self._connections_per_source.take(source):
            return await _respond(writer, 503, "this relay carries all the connections it allows from your address")
        connection_id = os.urandom(CONNECTION_ID_BYTES)
        connection = _Connection(peer_id, reader, writer, source)
        self._pending[connection_id] = connection
        registration.connections.add(connection)
        self.connections += 1
        try:
            try:
                registration.notices.put_nowait(pb.RelayNotice(incoming=pb.RelayIncoming(connection_id=connection_id)))
            except asyncio.QueueFull:  # the relayed peer is not taking its notices
                return await _respond(writer, 503, f"{peer_id} is not taking connections now")
            try:
                async with asyncio.timeout(self.limits.splice_timeout_s):
                    await connection.attached.wait()
            except TimeoutError:
                if self._pending.pop(connection_id, None) is not None:  # the peer did not take it
                    return await _respond(writer, 504, f"{peer_id} did not take the connection in time")
            await connection.done.wait()  # Splice copies the bytes; a cap or either side ends it
        finally:
            self._pending.pop(connection_id, None)
            registration.connections.discard(connection)
            self.connections -= 1
            self._connections_per_source.give_back(source)

    async def Splice(self, request_iterator: AsyncIterator[pb.RelayChunk],
                     context: grpc.aio.ServicerContext) -> None:
        try:
            async with asyncio.timeout(self.limits.splice_timeout_s):
                first = await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "name the connection first on a splice")
            return
        if first is grpc.aio.EOF:
            return
        connection = self._pending.pop(first.connection_id, None)  # the id is a secret only its peer was told
        if connection is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such relayed connection (expired or already taken)")
            return
        registration = self.peers.get(connection.peer_id)
        connection.attached.set()
        try:
            if registration is None:
                return
            connection.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await connection.writer.drain()
            await self._copy(connection, registration, context)
        except (ConnectionError, OSError) as error:
            logger.debug("relayed connection to %s ended: %r", connection.peer_id, error)
        finally:
            connection.writer.close()
            connection.done.set()

    async def _copy(self, connection: _Connection, registration: _Registration,
                    context: grpc.aio.ServicerContext) -> None:
        """Copies bytes both ways until either side ends, the byte budget is spent, or nothing moved
        either way for ``idle_timeout_s``."""
        last_moved = time.monotonic()

        def charge(direction: str, data: bytes) -> bool:
            nonlocal last_moved
            last_moved = time.monotonic()
            self.bytes_forwarded += len(data)
            if self._tap is not None:
                self._tap(direction, data)
            if registration.budget.charge(len(data)):
                return True
            logger.warning("relayed peer %s spent its byte budget (%d bytes this hour); closing its connection",
                           connection.peer_id, registration.budget.per_hour)
            return False

        async def up() -> None:  # client -> relayed peer
            while data := await connection.reader.read(CHUNK_BYTES):
                if not charge("up", data):
                    return
                await context.write(pb.RelayChunk(data=data))

        async def down() -> None:  # relayed peer -> client
            while (chunk := await context.read()) is not grpc.aio.EOF:
                if not charge("down", chunk.data):
                    return
                connection.writer.write(chunk.data)
                await connection.writer.drain()

        async def idle() -> None:  # ends the copy once both directions were silent too long
            idle_s = self.limits.idle_timeout_s
            while (left := last_moved + idle_s - time.monotonic()) > 0:
                await asyncio.sleep(left)
            logger.info("closing an idle relayed connection to %s", connection.peer_id)

        await first_to_end(up(), down(), idle())

    def close(self) -> None:
        """Ends every registration and connection (the gRPC server's stop ends the streams)."""
        for registration in list(self.peers.values()):
            registration.end()


async def first_to_end(*coroutines: object) -> None:
    """Runs the copy directions until one ends, then cancels the other; errors end it too (logged at debug)."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]  # type: ignore[arg-type]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
            logger.debug("a relayed direction ended: %r", result)


def _source_of(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    return source_key(str(peername[0]) if isinstance(peername, tuple) and peername else "?")


def source_key(host: str) -> str:
    """What per-source caps count for a client at ``host``: its IPv4 address (IPv4-mapped IPv6 as IPv4),
    or the /64 its IPv6 address is in. One subscriber usually holds a whole /64 and may use any of its
    addresses, so counting exact IPv6 addresses would give one person 2**64 sources."""
    ip = observed_host(f"{'ipv6' if ':' in host else 'ipv4'}:{host}:0")
    if ip is None:
        return host
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return ip


def parse_connect(head: bytes) -> str | None:
    """The relayed peer a CONNECT preamble names, or None when it is not one."""
    try:
        request_line = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or not parts[2].startswith("HTTP/1."):
        return None
    return relayed_peer_of(parts[1])


async def _respond(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    """A short HTTP error. gRPC shows the client only the status ("HTTP proxy returned response code
    404"), so each refusal has its own: 400 not a CONNECT, 404 not relayed here, 408 too slow,
    429 byte budget spent, 431 preamble too long, 503 connection caps, 504 the relayed peer did not answer."""
    body = reason.encode("ascii", "replace")[:200]
    writer.write(f"HTTP/1.1 {status} {reason[:200]}\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode("ascii", "replace") + body)
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()


class RelayListener:
    """The relay port: a plain TCP listener whose connections go to ``RelayService.handle_client``."""

    def __init__(self, service: RelayService, host: str, port: int):
        self.service = service
        self.host = host
        self.port = port
        self.bound_port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self.service.handle_client, self.host, self.port)
        self.bound_port = self._server.sockets[0].getsockname()[1]
        return self.bound_port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.service.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
