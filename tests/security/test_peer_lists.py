"""Allowlists and blocklists of peer ids, end to end on real peers.

- A client given an allowlist reads and routes through only those peers; given a blocklist, never
  through those (``ClientConfig.allowed_peers`` / ``blocked_peers``, ``brigade generate
  --allow-peers/--block-peers``).
- A peer given a client blocklist (``--block-client``) refuses that client's sessions and stateless
  passes with PERMISSION_DENIED and serves everyone else; a client it refuses routes around it.
- A peer given a peer blocklist (``PeerConfig.blocked_peers``, ``--block-peers``) does not forward
  to a blocked next hop: the outputs come back to the client instead, which links around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from brigade_inproc_peer import InProcessPeer
from brigade_peer_client import forward_token, open_session, peer_stub
from brigade_security import SecuritySwarm
from transformers import AutoModelForCausalLM

from brigade.client.config import ClientConfig
from brigade.client.model import DistributedModelForCausalLM
from brigade.peer.config import PeerConfig
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode

pytestmark = pytest.mark.timeout(240)
PROMPT = torch.tensor([[5, 17, 2, 99, 31, 8]])


def routable(security_swarm: SecuritySwarm, **options: Any) -> set[str]:
    """The peer ids a client with ``options`` would route through."""
    _, records = security_swarm.read_records(**options)
    return {record.peer_id for record in records}


def test_client_lists_decide_which_records_it_routes_through(security_swarm: SecuritySwarm) -> None:
    guard, twin = security_swarm.peer_id(security_swarm.guard), security_swarm.peer_id(security_swarm.twin)
    assert {guard, twin} <= routable(security_swarm)  # the plain-text peer is never routable by default
    assert routable(security_swarm, allowed_peers=[twin]) == {twin}
    assert twin not in routable(security_swarm, blocked_peers=[twin])
    assert routable(security_swarm, allowed_peers=[guard, twin], blocked_peers=[guard]) == {twin}
    with pytest.raises(ValueError, match="not brigade peer ids"):
        ClientConfig(allowed_peers=["bp-not-an-id!"])


def test_a_client_with_an_allowlist_generates_only_through_its_peers(security_swarm: SecuritySwarm) -> None:
    guard = security_swarm.peer_id(security_swarm.guard)
    reference = AutoModelForCausalLM.from_pretrained(security_swarm.checkpoint)
    with torch.no_grad():
        expected = reference.generate(PROMPT, max_new_tokens=5, do_sample=False)
    with DistributedModelForCausalLM.from_pretrained(str(security_swarm.checkpoint), security_swarm.initial_peers,
                                                     allowed_peers={guard}) as model:
        tokens = model.generate(PROMPT, max_new_tokens=5)
        route = model.last_route
    assert torch.equal(tokens, expected)
    assert route and all(hop.startswith(guard) for hop in route), route


def test_a_peer_refuses_a_blocked_client_and_serves_others(security_swarm: SecuritySwarm) -> None:
    info = security_swarm.guard.info
    blocked = Identity.load_or_create(security_swarm.blocked_key)
    channel, stub = peer_stub(info)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Inference(iter([open_session(info, "blocked-session-1", identity=blocked, start_layer=0,
                                                   end_layer=6, batch_size=1, max_length=8)]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"{blocked.peer_id} is not allowed to use this peer" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Forward(pb.ForwardRequest(start_layer=0, end_layer=6, hidden=encode(torch.randn(1, 2, 64)),
                                           token=forward_token(info, blocked)), timeout=30)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        responses = list(stub.Inference(iter([
            open_session(info, "allowed-session-1", start_layer=0, end_layer=6, batch_size=1, max_length=8),
            pb.InferenceRequest(session_id="allowed-session-1", step=pb.Step(hidden=encode(torch.randn(1, 3, 64)))),
        ]), timeout=30))
        assert responses[1].result.length == 3


def test_a_refused_client_routes_around_the_peer_that_blocks_it(security_swarm: SecuritySwarm) -> None:
    guard, twin = security_swarm.peer_id(security_swarm.guard), security_swarm.peer_id(security_swarm.twin)
    options: dict[str, Any] = dict(identity_path=str(security_swarm.blocked_key), allowed_peers={guard, twin},
                                   ban_base_s=60.0)
    with DistributedModelForCausalLM.from_pretrained(str(security_swarm.checkpoint), security_swarm.initial_peers,
                                                     **options) as model:
        model.generate(PROMPT, max_new_tokens=3)
        route = model.last_route
        refusals = [event for event in model.last_events if event.peer_id == guard]
    assert route and all(hop.startswith(twin) for hop in route), route
    assert all("not allowed to use this peer" in event.reason for event in refusals), refusals


def test_a_peer_does_not_forward_to_a_blocked_next_hop(llama_checkpoint: Path) -> None:
    outsider = Identity.generate()
    config = PeerConfig(model=str(llama_checkpoint), cache_tokens=1024, num_threads=1,
                        blocked_peers=frozenset({outsider.peer_id}))
    with InProcessPeer(llama_checkpoint, config) as peer:
        info = peer.info
        request = open_session(info, "forwarding-1", start_layer=0, end_layer=6, batch_size=1, max_length=8)
        request.open.next.CopyFrom(pb.NextHop(peer_id=outsider.peer_id, address=str(info["address"]),
                                              session_id="next-session-1", tls_cert=str(info["tls_cert"])))
        channel, stub = peer_stub(info)
        with channel:
            responses = list(stub.Inference(iter([request, pb.InferenceRequest(
                session_id="forwarding-1", step=pb.Step(hidden=encode(torch.randn(1, 2, 64)), step_id=1))]),
                timeout=30))
    result = responses[1].result
    assert not result.forwarded and "peer filter refuses it" in result.forward_error
    assert list(result.hidden.shape) == [1, 2, 64]  # the output came back to the client instead
