"""Transport security against real peers: a pinned certificate that does not match is refused, and
activations never cross the wire in plain text.

- A record signed by an identity of the test pins certificate A but points at a peer that presents
  certificate B (what a stale record, a hijacked address or a man in the middle look like). The
  client refuses the connection with an error that says so, its routing then avoids that record,
  and generation goes on through an honest peer with the same tokens as plain transformers.
- A recording TCP proxy sits between a client and a peer: activations carrying a recognisable byte
  pattern cross it. Over TLS the pattern is nowhere in the capture; through an ``--insecure`` peer
  (the control) it is there, so the capture would have shown it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from brigade_capture import CaptureThread
from brigade_peer_client import open_session, peer_stub
from brigade_security import SecuritySwarm
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM

from brigade.client.config import ClientConfig
from brigade.client.hops import HopFailure, HopStream
from brigade.client.model import DistributedModelForCausalLM
from brigade.client.remote import RemoteSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import encode
from brigade.protocol.tls import TlsIdentity
from brigade.routing.announce import Announcer
from brigade.routing.dht import start_dht
from brigade.routing.route import Hop

PATTERN = b"SEC@RET@ACT@IVA@"  # every 4th byte 0x40: as float32 these are finite values in [2, 8)
IMPOSTOR_TTL_S = 30.0


@dataclass
class Impostor:
    identity: Identity
    record: PeerRecord


@pytest.fixture(scope="module")
def impostor(security_swarm: SecuritySwarm) -> Iterator[Impostor]:
    """A signed record (fast, online) that pins a fresh certificate A at the guard's address, where
    the guard answers with its own certificate B. Announced as leaving at teardown."""
    identity = Identity.generate()
    certificate = TlsIdentity.generate(identity.peer_id)
    guard = security_swarm.guard.info
    dht = start_dht(security_swarm.initial_peers, client_mode=True)

    def make_record(state: str) -> PeerRecord:
        now = get_dht_time()
        return PeerRecord(
            peer_id=identity.peer_id, public_key=identity.public_key.hex(), address=str(guard["address"]),
            model_name=str(guard["model_name"]), start_layer=0, end_layer=6, num_layers=6, dtype="float32",
            throughput=1e6, prefill_throughput=1e7, free_cache_tokens=1 << 20, state=state,  # type: ignore[arg-type]
            signed_at=now, expires_at=now + IMPOSTOR_TTL_S, started_at=now, tls_cert=certificate.cert_pem.decode(),
            tls_spki_sha256=certificate.spki_sha256,
        )

    announcer = Announcer(dht, identity, make_record, period_s=IMPOSTOR_TTL_S / 2, ttl_s=IMPOSTOR_TTL_S)
    try:
        assert asyncio.run(announcer.announce_once("online"))
        yield Impostor(identity, make_record("online"))
        asyncio.run(announcer.announce_once("leaving"))  # later clients of this swarm must not meet it
    finally:
        dht.shutdown()


def test_a_certificate_that_does_not_match_the_record_is_refused(
    security_swarm: SecuritySwarm, impostor: Impostor
) -> None:
    swarm = RemoteSwarm(ClientConfig(), str(security_swarm.guard.info["model_name"]), 6, hidden_size=64)

    async def open_hop() -> None:
        try:
            await HopStream.open(swarm, Hop(impostor.record, 0, 6), batch_size=1, max_length=8, pad_lengths=[0])
        finally:
            await swarm.close()

    with pytest.raises(HopFailure) as caught:
        asyncio.run(open_hop())
    assert "did not present the certificate its signed record pins" in str(caught.value)
    assert impostor.identity.peer_id in str(caught.value)


def test_routing_avoids_the_mismatched_peer_and_generation_stays_exact(
    security_swarm: SecuritySwarm, impostor: Impostor, caplog: pytest.LogCaptureFixture
) -> None:
    twin = security_swarm.peer_id(security_swarm.twin)
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    reference = AutoModelForCausalLM.from_pretrained(security_swarm.checkpoint)
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=6, do_sample=False)
    # The impostor claims to be far faster than the twin, so it is the route's first choice.
    options: dict[str, Any] = dict(allowed_peers={impostor.identity.peer_id, twin}, ban_base_s=60.0)
    with caplog.at_level("WARNING"), DistributedModelForCausalLM.from_pretrained(
            str(security_swarm.checkpoint), security_swarm.initial_peers, **options) as model:
        tokens = model.generate(prompt, max_new_tokens=6)
        route = model.last_route
        refused = [event for event in model.last_events if event.peer_id == impostor.identity.peer_id]
        banned = model.bans.is_banned(impostor.identity.peer_id)
    assert torch.equal(tokens, expected)
    assert route and all(hop.startswith(twin) for hop in route), route
    # Either its ping or its session open met the mismatch: either way the client said why, and
    # a session that tried it banned it.
    said_why = [record.getMessage() for record in caplog.records if "its signed record pins" in record.getMessage()]
    assert said_why, [record.getMessage() for record in caplog.records]
    assert not refused or (banned and "its signed record pins" in refused[0].reason)


def pattern_hidden(positions: int = 8) -> torch.Tensor:
    data = bytearray(PATTERN * (positions * 64 * 4 // len(PATTERN)))
    return torch.frombuffer(data, dtype=torch.float32).view(1, positions, 64).clone()


def send_through(info: dict[str, object], address: str, session_id: str) -> int:
    """Opens a session on the peer ``info`` names via ``address`` (the proxy) and sends one pattern step."""
    hidden = pattern_hidden()
    assert bool(torch.isfinite(hidden).all())
    channel, stub = peer_stub({**info, "address": address})
    with channel:
        requests = [open_session(info, session_id, start_layer=0, end_layer=6, batch_size=1, max_length=16),
                    pb.InferenceRequest(session_id=session_id, step=pb.Step(hidden=encode(hidden), step_id=1))]
        responses = list(stub.Inference(iter(requests), timeout=30))
    assert responses[1].result.length == hidden.shape[1]
    return hidden.numel() * 4


@pytest.mark.parametrize("which", ["guard", "plain"])
def test_activations_do_not_cross_the_wire_in_plain_text(security_swarm: SecuritySwarm, which: str) -> None:
    peer = getattr(security_swarm, which)
    with CaptureThread(str(peer.info["address"])) as tap:
        sent = send_through(peer.info, tap.address, f"capture-{which}")
    captured = tap.captured
    assert len(captured) > sent  # the activations did cross this link
    if which == "guard":  # TLS: a handshake, then nothing readable
        assert captured[:1] == b"\x16" and PATTERN not in captured
    else:  # the control: the same bytes through a plain-text peer are there to read
        assert captured.count(PATTERN * 2) >= 8


def test_a_plain_text_peer_is_refused_by_default(security_swarm: SecuritySwarm) -> None:
    """The client never dials a record without a certificate unless it allows insecure peers."""
    plain = security_swarm.peer_id(security_swarm.plain)
    _, records = security_swarm.read_records()
    assert plain not in {record.peer_id for record in records}
    with pytest.raises(grpc.RpcError):  # and a TLS client cannot talk to it by accident
        channel, stub = peer_stub({**security_swarm.plain.info, "tls_cert": security_swarm.guard.info["tls_cert"]})
        with channel:
            stub.Info(pb.InfoRequest(), timeout=5)
