"""A record that copies an honest peer's address and pin cannot poison its channel (issue 19, defect 7).

The attacker signs, with an identity of its own, a record that copies the twin's address,
certificate and pin, adds a relay and announces a huge throughput so that every route tries it
first. A channel cache keyed by (address, pin) would hand the attacker's relayed channel to the
twin too: the twin's calls would fail and the honest twin would be banned. Keyed by the whole dial
(peer id, address, certificate, relay), the attacker's channel fails alone: the twin still answers
and the generation routes through it with the reference tokens.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from brigade_security import SecuritySwarm
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM

from brigade.client.config import ClientConfig
from brigade.client.model import DistributedModelForCausalLM
from brigade.client.remote import RemoteSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord
from brigade.routing.announce import Announcer
from brigade.routing.dht import start_dht

pytestmark = pytest.mark.timeout(240)
PROMPT = torch.tensor([[5, 17, 2, 99, 31, 8]])


def copycat(honest: PeerRecord, attacker: Identity, relay_id: str) -> PeerRecord:
    """The honest record's address, certificate and pin under the attacker's id, with a relay set."""
    return honest.model_copy(update={
        "peer_id": attacker.peer_id, "public_key": attacker.public_key.hex(), "relay_peer_id": relay_id,
        "reachable": False, "throughput": 1e9, "prefill_throughput": 1e9, "pings": {}})


def test_a_copied_address_and_pin_with_a_relay_poison_nothing(security_swarm: SecuritySwarm) -> None:
    twin_id, guard_id = security_swarm.peer_id(security_swarm.twin), security_swarm.peer_id(security_swarm.guard)
    _, records = security_swarm.read_records()
    honest = next(record for record in records if record.peer_id == twin_id)
    attacker = Identity.generate()
    evil = copycat(honest, attacker, guard_id)

    # The cache itself: the attacker's channel is dialed first, then the twin's must still answer.
    config = ClientConfig(initial_peers=tuple(security_swarm.initial_peers))
    swarm = RemoteSwarm(config, honest.model_name, 6, hidden_size=64)

    async def dial_both() -> str:
        try:
            with pytest.raises(grpc.aio.AioRpcError):
                await swarm.stub(evil).Info(pb.InfoRequest(), timeout=5)
            return (await swarm.stub(honest).Info(pb.InfoRequest(), timeout=5)).peer_id
        finally:
            await swarm.close()

    assert asyncio.run(dial_both()) == twin_id

    # End to end: the copycat is announced, tried first, fails alone; the twin serves the generation.
    dht = start_dht(security_swarm.initial_peers)
    try:
        def make_record(state: str) -> PeerRecord:
            return evil.model_copy(update={"state": state, "signed_at": get_dht_time()})

        assert asyncio.run(Announcer(dht, attacker, make_record, period_s=5, ttl_s=30).announce_once())
        reference = AutoModelForCausalLM.from_pretrained(security_swarm.checkpoint)
        with torch.no_grad():
            expected = reference.generate(PROMPT, max_new_tokens=5, do_sample=False)
        with DistributedModelForCausalLM.from_pretrained(
                str(security_swarm.checkpoint), security_swarm.initial_peers,
                allowed_peers={twin_id, attacker.peer_id}) as model:
            assert attacker.peer_id in {record.peer_id for record in asyncio.run(_records(security_swarm))}
            tokens = model.generate(PROMPT, max_new_tokens=5)
            route = model.last_route
        assert torch.equal(tokens, expected)
        assert route and all(hop.startswith(twin_id) for hop in route), route
    finally:
        dht.shutdown()


async def _records(security_swarm: SecuritySwarm) -> list[PeerRecord]:
    swarm = RemoteSwarm(ClientConfig(initial_peers=tuple(security_swarm.initial_peers)),
                        str(security_swarm.guard.info["model_name"]), 6, hidden_size=64)
    await swarm.start()
    try:
        return await swarm.records(0.0)
    finally:
        await swarm.close()
