"""Relays and probes over real gRPC on loopback, in one process: no DHT, no model, a few seconds.

Each node is a real TLS gRPC server with brigade's Relay and Reachability services, and a small
``Peer`` service (``Info`` and an echoing ``Forward``) standing for the relayed peer's own server:
what travels through a relay is opaque to the relay whatever the server behind it computes, so
the relay and the relayed link are the real code and only the model is left out. Generation
through relayed peer processes is tested in test_relayed_swarm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
import torch

from brigade.peer.reachability import ProbeService, ask, check_reachability
from brigade.peer.relay import RELAY_PURPOSE, RelayLimits, RelayListener, RelayService
from brigade.peer.relayed import RelayedLink, RelayState
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_options import grpc_options
from brigade.protocol.channels import peer_channel
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import decode, encode
from brigade.protocol.tls import TlsIdentity
from brigade.protocol.tokens import make_token

MESSAGE_BYTES = 8 * 1024 * 1024


class _Backend(pb_grpc.PeerServicer):
    """A peer's own server, reduced to what a test sends through a relay."""

    def __init__(self, peer_id: str):
        self.peer_id = peer_id

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(peer_id=self.peer_id)

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        hidden = decode(request.hidden)
        return pb.ForwardResponse(hidden=encode(hidden * 2))  # an answer the relay has not seen either


@dataclass
class Node:
    identity: Identity
    tls: TlsIdentity | None
    server: grpc.aio.Server
    port: int
    relay: RelayService | None = None
    listener: RelayListener | None = None
    taps: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def record(self) -> PeerRecord:
        return PeerRecord(
            peer_id=self.identity.peer_id, public_key=self.identity.public_key.hex(), address=f"127.0.0.1:{self.port}",
            model_name="m", start_layer=0, end_layer=1, num_layers=1, dtype="float32", signed_at=time.time(),
            tls_cert=self.tls.cert_pem.decode() if self.tls else "", tls_spki_sha256=self.tls.spki_sha256 if self.tls
            else "", relay_address=f"127.0.0.1:{self.listener.bound_port}" if self.listener else "")

    def relayed_record(self, state: RelayState) -> PeerRecord:
        return self.record.model_copy(update={"address": state.address, "relay_peer_id": state.relay_id,
                                              "reachable": False})

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        await self.server.stop(0)


async def start_node(*, secure: bool = True, limits: RelayLimits | None = None) -> Node:
    """A peer on 127.0.0.1: Info/Forward and Probe, plus a relay (service and port) when ``limits`` are given."""
    identity = Identity.generate()
    tls = TlsIdentity.generate(identity.peer_id) if secure else None
    server = grpc.aio.server(options=grpc_options(MESSAGE_BYTES))
    pb_grpc.add_PeerServicer_to_server(_Backend(identity.peer_id), server)
    pb_grpc.add_ReachabilityServicer_to_server(
        ProbeService(identity.peer_id, allow_insecure=not secure, allow_private=True), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials()) if tls else \
        server.add_insecure_port("127.0.0.1:0")
    node = Node(identity, tls, server, port)
    if limits is not None:
        node.relay = RelayService(identity.peer_id, lambda: f"127.0.0.1:{node.listener.bound_port}", limits,
                                  tap=lambda direction, data: node.taps.append((direction, data)))
        pb_grpc.add_RelayServicer_to_server(node.relay, server)
        node.listener = RelayListener(node.relay, "127.0.0.1", 0)
    await server.start()
    if node.listener is not None:
        await node.listener.start()
    return node


@dataclass
class Relayed:
    """A relayed peer's link, its task, and every relay change it reported."""

    node: Node
    link: RelayedLink
    task: asyncio.Task[None]
    changes: list[tuple[float, RelayState | None]] = field(default_factory=list)

    async def registered(self, timeout_s: float = 10.0) -> RelayState:
        async with asyncio.timeout(timeout_s):
            await self.link.registered.wait()
        assert self.link.current is not None
        return self.link.current


@contextlib.asynccontextmanager
async def relayed_through(node: Node, relays: list[Node], *, backend_port: int | None = None,
                          **link_options: object) -> AsyncIterator[Relayed]:
    async def find() -> list[PeerRecord]:
        return [relay.record for relay in relays]

    changes: list[tuple[float, RelayState | None]] = []

    async def on_change(state: RelayState | None) -> None:
        changes.append((time.monotonic(), state))

    cert = node.tls.cert_pem.decode() if node.tls else ""
    link = RelayedLink(node.identity, cert, ("127.0.0.1", backend_port or node.port), find, on_change,
                       allow_insecure=node.tls is None, **link_options)  # type: ignore[arg-type]
    task = asyncio.create_task(link.run())
    try:
        yield Relayed(node, link, task, changes)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def forward(record: PeerRecord, tensor: torch.Tensor, timeout_s: float = 10.0) -> torch.Tensor:
    channel = peer_channel(record, MESSAGE_BYTES, allow_insecure=not record.tls_cert)
    try:
        response = await pb_grpc.PeerStub(channel).Forward(pb.ForwardRequest(hidden=encode(tensor)), timeout=timeout_s)
        return decode(response.hidden)
    finally:
        await channel.close()


async def settled(relay: Node) -> None:
    """Until the relay carries no connection (the link's own path check has been torn down)."""
    async with asyncio.timeout(5):
        while relay.relay is not None and relay.relay.connections:
            await asyncio.sleep(0.01)


def run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 60))  # type: ignore[arg-type]


def _activation(numel: int = 16 * 1024) -> torch.Tensor:
    return torch.randn(1, numel // 64, 64, generator=torch.Generator().manual_seed(3))


# -- the data path ------------------------------------------------------------------------------------
def test_a_client_reaches_a_relayed_peer_over_its_own_pinned_tls() -> None:
    async def scenario() -> None:
        relay, peer = await start_node(limits=RelayLimits()), await start_node()
        try:
            async with relayed_through(peer, [relay]) as relayed:
                state = await relayed.registered()
                assert state == RelayState(relay.identity.peer_id, relay.record.relay_address)
                target = peer.relayed_record(state)
                tensor = _activation()
                assert torch.equal(await forward(target, tensor), tensor * 2)
                # Several calls and channels at once, each its own relayed connection.
                results = await asyncio.gather(*(forward(target, tensor + i) for i in range(4)))
                assert all(torch.equal(result, (tensor + i) * 2) for i, result in enumerate(results))
                assert relay.relay.connections == 0 or relay.relay.connections <= 4
        finally:
            await peer.stop()
            await relay.stop()

    run(scenario())


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "plaintext-control"])
def test_the_relay_sees_only_ciphertext(secure: bool) -> None:
    """Every byte the relay forwards, both ways, is searched for the activations it carried.

    The plain-text control (an --insecure pair, which brigade never relays) shows the search finds
    them when they are there; with TLS neither the request's nor the answer's tensor bytes appear.
    """

    async def scenario() -> None:
        relay, peer = await start_node(limits=RelayLimits()), await start_node(secure=secure)
        try:
            async with relayed_through(peer, [relay]) as relayed:
                target = peer.relayed_record(await relayed.registered())
                tensor = _activation(64 * 1024)
                answer = await forward(target, tensor)
        finally:
            await peer.stop()
            await relay.stop()
        up = b"".join(data for direction, data in relay.taps if direction == "up")
        down = b"".join(data for direction, data in relay.taps if direction == "down")
        sent, received = tensor.numpy().tobytes(), answer.numpy().tobytes()
        assert len(up) > len(sent) and len(down) > len(received)  # it all went through the relay
        windows = [(sent, up), (received, down)]
        found = [payload[i:i + 32] in stream for payload, stream in windows for i in range(0, len(payload), 4099)]
        assert all(found) if not secure else not any(found)

    run(scenario())


def test_a_relay_cannot_pass_another_server_off_as_the_relayed_peer() -> None:
    """The client pins the relayed peer's certificate from its signed record: a relay that splices the
    connection to any other server (here: another peer it relays) fails the handshake instead of
    being believed. A link whose own path does not lead back to itself never announces the relay."""

    async def scenario() -> None:
        relay, peer, impostor = await start_node(limits=RelayLimits()), await start_node(), await start_node()
        try:
            async with relayed_through(impostor, [relay]) as relayed:
                state = await relayed.registered()
                # What a relay that sends connections for `peer` to the impostor would do.
                target = peer.relayed_record(state).model_copy(update={"peer_id": impostor.identity.peer_id})
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await forward(target, _activation(), timeout_s=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert torch.equal(await forward(impostor.relayed_record(state), _activation()), _activation() * 2)
            async with relayed_through(peer, [relay], backend_port=impostor.port, register_timeout_s=2.0) as wrong:
                await asyncio.sleep(1.5)
                assert not wrong.link.registered.is_set() and wrong.changes == []
        finally:
            for node in (peer, impostor, relay):
                await node.stop()

    run(scenario())


# -- caps and bad input -------------------------------------------------------------------------------
def test_connection_caps_unknown_peers_and_byte_budgets_get_clear_refusals() -> None:
    async def scenario() -> None:
        limits = RelayLimits(max_connections_per_peer=1, max_bytes_per_hour=300_000)
        relay, peer = await start_node(limits=limits), await start_node()
        try:
            async with relayed_through(peer, [relay]) as relayed:
                target = peer.relayed_record(await relayed.registered())
                await settled(relay)
                held = peer_channel(target, MESSAGE_BYTES)  # one connection, kept open
                await pb_grpc.PeerStub(held).Info(pb.InfoRequest(), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError, match="503"):
                    await forward(target, _activation(), timeout_s=5)
                await held.close()
                await asyncio.sleep(0.2)
                unknown = target.model_copy(update={"peer_id": Identity.generate().peer_id})
                with pytest.raises(grpc.aio.AioRpcError, match="404"):
                    await forward(unknown, _activation(), timeout_s=5)
                # 300 kB an hour: a 400 kB activation ends the connection, and later ones are refused.
                with pytest.raises(grpc.aio.AioRpcError):
                    await forward(target, _activation(100 * 1024), timeout_s=5)
                await asyncio.sleep(0.2)
                with pytest.raises(grpc.aio.AioRpcError, match="code 429"):  # the byte budget is spent
                    await forward(target, _activation(), timeout_s=5)
        finally:
            await peer.stop()
            await relay.stop()

    run(scenario())


def test_the_relay_port_answers_junk_and_silence_and_keeps_serving() -> None:
    async def scenario() -> None:
        relay = await start_node(limits=RelayLimits(preamble_timeout_s=0.3))
        port = relay.listener.bound_port
        try:
            for junk, status in ((b"GET / HTTP/1.1\r\n\r\n", b"400"), (b"", b"408"),
                                 (b"CONNECT " + b"x" * 70_000, b"400")):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(junk)
                answer = await asyncio.wait_for(reader.read(200), 5)
                assert answer.startswith(b"HTTP/1.1 " + status), answer
                writer.close()
            assert relay.relay.connections == 0
        finally:
            await relay.stop()

    run(scenario())


def test_registrations_need_a_valid_token_and_respect_the_peer_cap() -> None:
    async def scenario() -> None:
        relay = await start_node(limits=RelayLimits(max_peers=1))
        channel = peer_channel(relay.record)
        stub = pb_grpc.RelayStub(channel)

        async def register(identity: Identity, audience: str) -> pb.RelayNotice:
            call = stub.Tunnel()
            await call.write(pb.RelayControl(register=pb.RelayRegister(
                token=make_token(identity, audience, RELAY_PURPOSE))))
            return await call.read()

        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await register(Identity.generate(), Identity.generate().peer_id)  # a token for another relay
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            first = await register(Identity.generate(), relay.identity.peer_id)
            assert first.registered.address == relay.record.relay_address
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await register(Identity.generate(), relay.identity.peer_id)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await channel.close()
            await relay.stop()

    run(scenario())


# -- a relay that dies ----------------------------------------------------------------------------------
def test_a_relayed_peer_moves_to_another_relay_when_its_relay_dies() -> None:
    async def scenario() -> None:
        first, second, peer = (await start_node(limits=RelayLimits()), await start_node(limits=RelayLimits()),
                               await start_node())
        try:
            async with relayed_through(peer, [first, second]) as relayed:
                state = await relayed.registered()
                used, other = (first, second) if state.relay_id == first.identity.peer_id else (second, first)
                killed_at = time.monotonic()
                await used.stop()
                async with asyncio.timeout(10):
                    while relayed.link.current is None or relayed.link.current.relay_id != other.identity.peer_id:
                        await asyncio.sleep(0.02)
                moved_after = time.monotonic() - killed_at
                assert [s.relay_id if s else None for _, s in relayed.changes] == [
                    used.identity.peer_id, None, other.identity.peer_id]
                assert relayed.changes[1][0] - killed_at < 2.0  # lost at once: the peer re-announces without it
                assert moved_after < 5.0, moved_after
                tensor = _activation()
                assert torch.equal(await forward(peer.relayed_record(relayed.link.current), tensor), tensor * 2)
        finally:
            for node in (peer, first, second):
                with contextlib.suppress(Exception):
                    await node.stop()

    run(scenario())


# -- probes -----------------------------------------------------------------------------------------------
def test_probes_connect_back_and_check_who_answers() -> None:
    async def scenario() -> None:
        prober, requester, other = await start_node(), await start_node(), await start_node()
        try:
            cert = requester.tls.cert_pem.decode()
            own = f"127.0.0.1:{requester.port}"
            result = await ask(requester.identity, prober.record, own, cert, 2.0)
            assert result.answered and result.reachable and result.observed_host == "127.0.0.1"
            closed = await ask(requester.identity, prober.record, "127.0.0.1:9", cert, 2.0)
            assert closed.answered and not closed.reachable and "UNAVAILABLE" in closed.detail
            # Another peer answers at that address: the pinned certificate (its own) does not match.
            wrong = await ask(requester.identity, prober.record, f"127.0.0.1:{other.port}", cert, 2.0)
            assert wrong.answered and not wrong.reachable
            verdict = await check_reachability(requester.identity, own, cert, [prober.record, requester.record])
            assert verdict.reachable is True and len(verdict.results) == 1  # never asks itself
            nobody = await check_reachability(requester.identity, own, cert, [])
            assert nobody.reachable is None
            gone = prober.record
            await prober.stop()
            unanswered = await ask(requester.identity, gone, own, cert, 1.0)
            assert not unanswered.answered
        finally:
            for node in (requester, other, prober):
                with contextlib.suppress(Exception):
                    await node.stop()

    run(scenario())


def test_a_probe_with_a_token_for_another_address_is_refused() -> None:
    async def scenario() -> None:
        prober, requester = await start_node(), await start_node()
        channel = peer_channel(prober.record)
        try:
            cert = requester.tls.cert_pem.decode()
            token = make_token(requester.identity, prober.identity.peer_id, "probe", b"127.0.0.1:1\0" + cert.encode())
            request = pb.ProbeRequest(address=f"127.0.0.1:{requester.port}", tls_cert=cert, token=token)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.ReachabilityStub(channel).Probe(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await channel.close()
            await requester.stop()
            await prober.stop()

    run(scenario())
