"""Relayed peers in a real swarm on loopback: peer processes, a DHT, the client library.

One bootstrap node and three peers for the module: A hosts layers 0:3 and relays; B hosts 3:6 and
is always relayed (``--reachability relayed``: on loopback every peer is reachable, so B is told
to behave as one behind a home router); C hosts 3:6 too and checks its reachability by asking A.
A's relay port is announced behind a tapping TCP proxy in this test process, so every byte the
relay carries for B (from clients, and from A forwarding activations to B) is recorded.

Starts DHT nodes and peer processes: run under the shared swarm lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS, build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import decode, encode
from brigade.protocol.tokens import make_token

SEED = 5
NEW_TOKENS = 12
PROMPT = [3, 141, 59, 26, 53, 58, 97, 9, 33]


class TapProxy:
    """A TCP forwarder on its own thread that keeps a copy of every byte, both ways (bounded)."""

    LIMIT = 64 * 1024 * 1024

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.up = bytearray()  # towards the relay (clients and A's pushes to B)
        self.down = bytearray()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tap")
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> TapProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, copy: bytearray) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    if len(copy) < self.LIMIT:
                        copy += data
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, upstream_writer, self.up), pump(upstream_reader, writer, self.down))

    def close(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def relayed_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalSwarm, Path, TapProxy]]:
    folder = tmp_path_factory.mktemp("relayed")
    checkpoint = build_checkpoint(folder / "tiny-llama", "llama", seed=SEED)
    relay_port = _free_port()
    tap = TapProxy(relay_port).start()
    swarm = LocalSwarm(folder / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        swarm.add_peer(str(checkpoint), (0, 3), extra_args=[
            *FAST_PEER_ARGS, "--relay", "--relay-port", str(relay_port), "--relay-announce-port", str(tap.port)])
        relayed = swarm.add_peer(str(checkpoint), (3, 6), extra_args=[*FAST_PEER_ARGS, "--reachability", "relayed"],
                                 wait=False)
        direct = swarm.add_peer(str(checkpoint), (3, 6), extra_args=FAST_PEER_ARGS, wait=False)
        swarm.wait_ready(relayed)
        swarm.wait_ready(direct)
        yield swarm, checkpoint, tap
    finally:
        swarm.close()
        tap.close()


def _reference(new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = build_model("llama", seed=SEED).generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens,
                                                         do_sample=False)
    return out[0, len(PROMPT):].tolist()


def test_a_relayed_peer_serves_and_forwarding_reaches_it_through_the_relay(
        relayed_swarm: tuple[LocalSwarm, Path, TapProxy]) -> None:
    swarm, checkpoint, tap = relayed_swarm
    relay, relayed, direct = swarm.peers
    assert relay.info["relay_address"] == f"127.0.0.1:{tap.port}"
    assert relayed.info["reachable"] is False and relayed.info["relay_peer_id"] == relay.info["peer_id"]
    assert relayed.info["announced_address"] == f"127.0.0.1:{tap.port}"
    assert direct.info["reachable"] is True  # A dialed it back and found it
    assert "serving through relay" in relayed.log_path.read_text()
    with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers,
                                                     blocked_peers=frozenset({str(direct.info["peer_id"])})) as model:
        records: list[PeerRecord] = model._loop.run(model.swarm.records(0.0), 30)
        announced = {record.peer_id: record for record in records}[str(relayed.info["peer_id"])]
        assert (announced.reachable, announced.relay_peer_id) == (False, relay.info["peer_id"])
        assert announced.address == f"127.0.0.1:{tap.port}"
        before = len(tap.up)
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert tokens[0, len(PROMPT):].tolist() == _reference(NEW_TOKENS)
        assert [hop.split("[")[0] for hop in model.last_route] == [relay.info["peer_id"], relayed.info["peer_id"]]
        assert model.last_events == []  # A pushed to B through the relay: no pair fell back to the client
        assert len(tap.up) > before


def test_what_the_relay_carries_is_ciphertext(relayed_swarm: tuple[LocalSwarm, Path, TapProxy]) -> None:
    """A stateless Forward through the relay, with activations the test chose: neither they nor the
    answer's bytes appear anywhere in what the relay carried, though the CONNECT preamble (plain
    text by design) does, so the tap saw the raw stream."""
    swarm, checkpoint, tap = relayed_swarm
    relayed = swarm.peers[1]
    hidden = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(9))
    with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
        records: list[PeerRecord] = model._loop.run(model.swarm.records(0.0), 30)
        record = {r.peer_id: r for r in records}[str(relayed.info["peer_id"])]
        request = pb.ForwardRequest(start_layer=3, end_layer=6, hidden=encode(hidden),
                                    token=make_token(model.swarm.identity, record.peer_id, "forward"))

        async def call() -> pb.ForwardResponse:
            return await model.swarm.stub(record).Forward(request, timeout=30)

        response = model._loop.run(call(), 40)
    output = decode(response.hidden)
    assert output.shape == hidden.shape and not torch.equal(output, hidden)
    up, down = bytes(tap.up), bytes(tap.down)
    assert f"CONNECT {record.peer_id}.relayed.brigade.invalid:443".encode() in up
    sent, received = hidden.numpy().tobytes(), output.numpy().tobytes()
    assert len(up) > len(sent) and len(down) > len(received)
    for payload, stream in ((sent, up), (received, down)):
        assert not any(payload[i:i + 16] in stream for i in range(0, len(payload) - 16, 1021))
