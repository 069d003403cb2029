"""No client, record or probe can make a peer or the dashboard connect where it chooses (issue 19, defect 4).

Each attempt names a local listener (a plain TCP socket of the test) that must receive no
connection, and what comes back must carry no detail of the failure (no address, no port, no
OpenSSL or gRPC text):

- ``NextHop`` at open names the next peer's id but the listener's address, certificate and a
  relay: the peer forwards to the next peer's real address, read from that peer's own signed record;
- ``Relink`` does the same mid-session, and a next hop with no record gets only a coarse reason;
- ``Probe`` from the prober's loopback (where relayed connections come from) asks a peer of a
  public swarm to dial the listener: refused;
- a dashboard probe of a record naming the listener (or a name resolving to loopback) outside a
  private swarm: not dialed; a failed probe shows a coarse reason.
"""

from __future__ import annotations

import asyncio
import queue
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from brigade_peer_client import CLIENT, open_session, peer_stub
from brigade_security import SecuritySwarm
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS

from brigade.dashboard.probe import probe_peer
from brigade.deploy.launcher import LaunchedProcess, LocalSwarm
from brigade.peer.reachability import PROBE_PURPOSE, probe_binding
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import encode
from brigade.protocol.tls import TlsIdentity
from brigade.protocol.tokens import make_token

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain TCP listener that nothing should ever connect to."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def connected(sock: socket.socket, wait_s: float = 0.5) -> bool:
    """Whether a connection is waiting on the listener (the backlog holds it without accept)."""
    readable, _, _ = select.select([sock], [], [], wait_s)
    return bool(readable)


def leaks(text: str, sock: socket.socket) -> bool:
    port = str(sock.getsockname()[1])
    return port in text or "127.0.0.1" in text or "ssl" in text.lower() or "handshake" in text.lower()


class Stream:
    """One Inference stream driven from the test thread: send requests, read responses, bounded."""

    def __init__(self, info: dict[str, object]):
        self.channel, stub = peer_stub(info)
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue(maxsize=16)
        self._responses: queue.Queue[pb.InferenceResponse | BaseException] = queue.Queue(maxsize=64)
        self._call = stub.Inference(iter(self._requests.get, None), timeout=60)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response, timeout=30)
        except grpc.RpcError as error:
            self._responses.put(error, timeout=30)

    def send(self, request: pb.InferenceRequest) -> None:
        self._requests.put(request, timeout=10)

    def next(self, timeout_s: float = 30.0) -> pb.InferenceResponse:
        item = self._responses.get(timeout=timeout_s)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._requests.put(None, timeout=10)
        self._call.cancel()
        self.channel.close()


def hidden_step(session_id: str) -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, step=pb.Step(hidden=encode(torch.randn(1, 2, 64)), step_id=1))


def lure(peer_id: str, session_id: str, sock: socket.socket, cert: str) -> pb.NextHop:
    """A next hop naming ``peer_id`` but the listener's address, a certificate and a relay."""
    return pb.NextHop(peer_id=peer_id, address=f"127.0.0.1:{sock.getsockname()[1]}", session_id=session_id,
                      tls_cert=cert, relay_peer_id="")


def test_next_hop_and_relink_dial_the_record_not_the_client_s_address(
        security_swarm: SecuritySwarm, listener: socket.socket) -> None:
    guard, twin = security_swarm.guard.info, security_swarm.twin.info
    cert = str(twin["tls_cert"])
    for how in ("open", "relink"):
        downstream, upstream = Stream(twin), Stream(guard)
        try:
            downstream.send(open_session(twin, f"ssrf-{how}-down", start_layer=3, end_layer=6, batch_size=1,
                                         max_length=8, upstream_peer_id=str(guard["peer_id"])))
            assert downstream.next().HasField("opened")
            hop = lure(str(twin["peer_id"]), f"ssrf-{how}-down", listener, cert)
            request = open_session(guard, f"ssrf-{how}-up", start_layer=0, end_layer=3, batch_size=1, max_length=8)
            if how == "open":
                request.open.next.CopyFrom(hop)
            upstream.send(request)
            assert upstream.next().HasField("opened")
            if how == "relink":
                upstream.send(pb.InferenceRequest(session_id=f"ssrf-{how}-up", relink=pb.Relink(next=hop)))
                assert upstream.next().HasField("relinked")
            upstream.send(hidden_step(f"ssrf-{how}-up"))
            result = upstream.next().result
            assert result.forwarded, (how, result.forward_error)  # to the twin's real address, from its record
            assert list(downstream.next().result.hidden.shape) == [1, 2, 64]
        finally:
            upstream.close()
            downstream.close()
        assert not connected(listener), how


def test_a_next_hop_without_a_record_gets_a_coarse_reason_and_no_connection(
        security_swarm: SecuritySwarm, listener: socket.socket) -> None:
    guard = security_swarm.guard.info
    stranger = Identity.generate().peer_id
    stream = Stream(guard)
    try:
        stream.send(open_session(guard, "ssrf-stranger-1", start_layer=0, end_layer=6, batch_size=1, max_length=8))
        assert stream.next().HasField("opened")
        hop = lure(stranger, "ssrf-stranger-2", listener, str(guard["tls_cert"]))
        hop.relay_peer_id = stranger
        stream.send(pb.InferenceRequest(session_id="ssrf-stranger-1", relink=pb.Relink(next=hop)))
        assert stream.next().HasField("relinked")
        stream.send(hidden_step("ssrf-stranger-1"))
        result = stream.next().result
    finally:
        stream.close()
    assert not result.forwarded and list(result.hidden.shape) == [1, 2, 64]
    assert "no signed record" in result.forward_error and not leaks(result.forward_error, listener)
    assert not connected(listener)


@pytest.fixture(scope="module")
def public_peer(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedProcess]:
    """A peer of a swarm configured public (``--public-swarm``), though it runs on 127.0.0.1."""
    swarm = LocalSwarm(tmp_path_factory.mktemp("ssrf-public") / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        yield swarm.add_peer(str(llama_checkpoint), (0, 1), extra_args=[
            *FAST_PEER_ARGS, "--public-swarm", "--reachability", "direct"])
    finally:
        swarm.close()


def test_probe_from_loopback_does_not_dial_in_a_public_swarm(public_peer: LaunchedProcess,
                                                             listener: socket.socket) -> None:
    info = public_peer.info
    cert = str(info["tls_cert"])
    channel, _ = peer_stub(info)
    with channel:
        for address in (f"127.0.0.1:{listener.getsockname()[1]}", f"localhost:{listener.getsockname()[1]}"):
            token = make_token(CLIENT, str(info["peer_id"]), PROBE_PURPOSE, probe_binding(address, cert))
            response = pb_grpc.ReachabilityStub(channel).Probe(
                pb.ProbeRequest(address=address, tls_cert=cert, token=token, timeout_s=1.0), timeout=10)
            assert not response.reachable, address
            assert not leaks(response.detail, listener), response.detail
    assert not connected(listener)


def test_the_dashboard_probes_no_private_address_and_shows_no_details(
        security_swarm: SecuritySwarm, listener: socket.socket) -> None:
    guard = security_swarm.guard.info
    identity = Identity.generate()
    port = listener.getsockname()[1]

    def record(address: str, cert: str = "") -> PeerRecord:
        return PeerRecord(peer_id=identity.peer_id, public_key=identity.public_key.hex(), address=address,
                          model_name=str(guard["model_name"]), start_layer=0, end_layer=6, num_layers=6,
                          dtype="float32", throughput=1.0, signed_at=1.0, expires_at=2.0, tls_cert=cert)

    async def probe(address: str, **options: bool) -> str:
        result = await probe_peer(record(address, str(guard["tls_cert"])), 1.0, **options)
        assert not result.reachable
        return result.error

    for address in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::ffff:127.0.0.1]:{port}"):
        error = asyncio.run(probe(address))
        assert error.startswith("not probed") and not leaks(error, listener), error
    assert not connected(listener)
    # In a private swarm it is dialed, but a failure shows only a coarse reason: here the guard
    # answers with another certificate than the record pins (OpenSSL's words stay in the log).
    wrong = Identity.generate()
    error = asyncio.run(probe_peer(record(str(guard["address"]),
                                          TlsIdentity.generate(wrong.peer_id).cert_pem.decode()),
                                   2.0, allow_private=True)).error
    assert error == "unreachable (UNAVAILABLE)", error
