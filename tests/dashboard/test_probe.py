"""Probing peers over real gRPC on 127.0.0.1: who answers, who refuses, who hangs, who lies."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
from brigade_dashboard import peer_record

from brigade.dashboard.probe import address_problem, probe_all, probe_peer
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity


class InfoOnly(pb_grpc.PeerServicer):
    """A peer service that only answers Info, as the peer id it was given."""

    def __init__(self, peer_id: str, model: str = "m"):
        self.peer_id, self.model = peer_id, model

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(peer_id=self.peer_id, model_name=self.model, state="online", free_cache_tokens=77,
                               open_sessions=1)


async def serve(servicer: InfoOnly) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_PeerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_probe_answers_refusals_hangs_and_impostors() -> None:
    identity, other = Identity.generate(), Identity.generate()

    async def scenario() -> None:
        server, port = await serve(InfoOnly(identity.peer_id))
        silent = socket.socket()  # accepts TCP connections (backlog) and never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        try:
            answered = await probe_peer(peer_record(identity, "m", 0, 2, 4, address=f"127.0.0.1:{port}"),
                                 2.0, allow_private=True)
            assert answered.reachable and answered.rtt_ms is not None and 0 < answered.rtt_ms < 2000
            assert (answered.free_cache_tokens, answered.open_sessions, answered.state) == (77, 1, "online")

            impostor = await probe_peer(peer_record(other, "m", 0, 2, 4, address=f"127.0.0.1:{port}"),
                                 2.0, allow_private=True)
            assert not impostor.reachable and "answered as another peer" in impostor.error

            wrong_model = await probe_peer(peer_record(identity, "n", 0, 2, 4, address=f"127.0.0.1:{port}"),
                                 2.0, allow_private=True)
            assert not wrong_model.reachable and "serves another model" in wrong_model.error

            began = time.monotonic()
            refused = await probe_peer(peer_record(identity, "m", 0, 2, 4, address=f"127.0.0.1:{closed_port()}"),
                                     2.0, allow_private=True)
            assert not refused.reachable and refused.error == "unreachable (UNAVAILABLE)"
            assert time.monotonic() - began < 1.5

            began = time.monotonic()
            hung = await probe_peer(
                peer_record(identity, "m", 0, 2, 4, address=f"127.0.0.1:{silent.getsockname()[1]}"), 0.5,
                allow_private=True)
            assert not hung.reachable and "no answer within 0.5 s" in hung.error
            assert time.monotonic() - began < 2.0

            for address in ("not an address", "unix:/tmp/x.sock", "unix-abstract:x", "dns:///evil:80", "h:0",
                            "h:99999", "[::1]:x"):
                junk = await probe_peer(peer_record(identity, "m", 0, 2, 4, address=address), 0.5)
                assert not junk.reachable and junk.error.startswith("not probed"), address
            assert address_problem("[::1]:5000") == address_problem("peer-3.example.org:443") == ""
        finally:
            silent.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_public_probe_does_not_tell_a_closed_port_from_a_silent_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Outside a private swarm a record may name any public host: the page gives one reason for every
    failure, so it is no port scanner. (Loopback stands in for a public address here: the target check,
    ``dial_target``, is told it is public.)"""
    from brigade.dashboard import probe

    async def as_if_public(address: str, *, allow_private: bool, timeout_s: float) -> str:
        return address

    monkeypatch.setattr(probe, "dial_target", as_if_public)
    identity = Identity.generate()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        closed = asyncio.run(probe_peer(peer_record(identity, "m", 0, 2, 4, address=f"127.0.0.1:{closed_port()}"),
                                        0.5))
        hung = asyncio.run(probe_peer(
            peer_record(identity, "m", 0, 2, 4, address=f"127.0.0.1:{silent.getsockname()[1]}"), 0.5))
    finally:
        silent.close()
    assert not closed.reachable and not hung.reachable
    assert closed.error == hung.error == probe.PUBLIC_UNREACHABLE


def test_probe_all_bounds_concurrency_and_time() -> None:
    """40 hanging peers, 8 probes at a time, 0.3 s each: about 5 rounds, never one long wait."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    records = [peer_record(Identity.generate(), "m", 0, 2, 4, address=address) for _ in range(40)]
    try:
        began = time.monotonic()
        results = asyncio.run(probe_all(records, timeout_s=0.3, concurrency=8, allow_private=True))
        elapsed = time.monotonic() - began
    finally:
        silent.close()
    assert len(results) == 40 and not any(result.reachable for result in results.values())
    assert 1.2 < elapsed < 6.0  # 5 rounds of 0.3 s; far below 40 x 0.3 s
