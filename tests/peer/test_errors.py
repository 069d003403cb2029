"""Bad requests get a clear gRPC status, and the peer serves the next request normally."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from brigade_peer_client import forward_token, open_session, peer_stub

from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.tensors import encode

HIDDEN = 64


PEER: dict[str, object] = {}  # the ready line of the peer under test (layers 0:2), set by the fixture


@pytest.fixture(scope="module")
def stub(llama_swarm: LocalSwarm) -> Iterator[pb_grpc.PeerStub]:
    PEER.update(llama_swarm.peers[0].info)  # hosts layers 0:2
    channel, stub = peer_stub(PEER, [("grpc.max_send_message_length", 256 << 20)])
    with channel:
        yield stub


def open_request(session_id: str = "session-ok-1", max_length: int = 16, **fields: object) -> pb.InferenceRequest:
    return open_session(PEER, session_id, start_layer=0, end_layer=2, batch_size=1, max_length=max_length, **fields)


def step_request(tensor: pb.Tensor, session_id: str = "session-ok-1", start: int = 0) -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, step=pb.Step(hidden=tensor, start_position=start, step_id=1))


def run_stream(stub: pb_grpc.PeerStub, requests: list[pb.InferenceRequest]) -> list[pb.InferenceResponse]:
    return list(stub.Inference(iter(requests), timeout=30))


def assert_peer_still_serves(stub: pb_grpc.PeerStub) -> None:
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert info.state == "online" and info.open_sessions == 0
    responses = run_stream(stub, [open_request("session-after"), step_request(encode(torch.randn(1, 3, HIDDEN)),
                                                                              "session-after")])
    assert responses[1].result.length == 3


def expect_status(stub: pb_grpc.PeerStub, requests: list[pb.InferenceRequest], code: grpc.StatusCode,
                  text: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        run_stream(stub, requests)
    assert caught.value.code() == code, caught.value.details()
    assert text in caught.value.details()
    assert_peer_still_serves(stub)


def test_malformed_tensor(stub: pb_grpc.PeerStub) -> None:
    bad = pb.Tensor(dtype="float32", shape=[1, 2, HIDDEN], data=b"\0" * 100)
    expect_status(stub, [open_request(), step_request(bad)], grpc.StatusCode.INVALID_ARGUMENT, "needs 512 bytes")


def test_wrong_dtype(stub: pb_grpc.PeerStub) -> None:
    bad = pb.Tensor(dtype="int64", shape=[1, 1, HIDDEN], data=b"\0" * 8 * HIDDEN)
    expect_status(stub, [open_request(), step_request(bad)], grpc.StatusCode.INVALID_ARGUMENT, "unsupported dtype")


def test_tensor_declaring_a_huge_shape_is_refused_before_allocation(stub: pb_grpc.PeerStub) -> None:
    bad = pb.Tensor(dtype="float32", shape=[64, 1 << 20, HIDDEN], data=b"")
    expect_status(stub, [open_request(), step_request(bad)], grpc.StatusCode.INVALID_ARGUMENT, "exceeds")


def test_oversized_message(stub: pb_grpc.PeerStub) -> None:
    huge = pb.Tensor(dtype="float32", shape=[1, (65 << 20) // (4 * HIDDEN), HIDDEN], data=b"\0" * (65 << 20))
    expect_status(stub, [open_request(max_length=512), step_request(huge)],
                  grpc.StatusCode.RESOURCE_EXHAUSTED, "")


def test_wrong_hidden_size(stub: pb_grpc.PeerStub) -> None:
    expect_status(stub, [open_request(), step_request(encode(torch.randn(1, 2, HIDDEN + 1)))],
                  grpc.StatusCode.INVALID_ARGUMENT, "hidden size 65 does not match the model's 64")


def test_unknown_session(stub: pb_grpc.PeerStub) -> None:
    expect_status(stub, [step_request(encode(torch.randn(1, 1, HIDDEN)), "no-such-session")],
                  grpc.StatusCode.NOT_FOUND, "unknown session 'no-such-session'")


def test_step_past_max_length(stub: pb_grpc.PeerStub) -> None:
    requests = [open_request(max_length=4), step_request(encode(torch.randn(1, 3, HIDDEN))),
                step_request(encode(torch.randn(1, 2, HIDDEN)), start=3)]
    expect_status(stub, requests, grpc.StatusCode.OUT_OF_RANGE, "past the session's max_length 4")


def test_layers_outside_the_span(stub: pb_grpc.PeerStub) -> None:
    request = open_session(PEER, "session-far", start_layer=2, end_layer=4, batch_size=1, max_length=8)
    expect_status(stub, [request], grpc.StatusCode.INVALID_ARGUMENT, "not inside this peer's span 0:2")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Forward(pb.ForwardRequest(start_layer=0, end_layer=3, hidden=encode(torch.randn(1, 2, HIDDEN)),
                                       token=forward_token(PEER)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_peer_still_serves(stub)


def test_bad_session_parameters(stub: pb_grpc.PeerStub) -> None:
    expect_status(stub, [open_request(session_id="x")], grpc.StatusCode.INVALID_ARGUMENT, "session_id")
    expect_status(stub, [open_request(max_length=0)], grpc.StatusCode.INVALID_ARGUMENT, "max_length")
    expect_status(stub, [open_request(), open_request()], grpc.StatusCode.INVALID_ARGUMENT, "already has a session")


def test_missing_forged_replayed_or_misaddressed_tokens(stub: pb_grpc.PeerStub) -> None:
    bare = pb.InferenceRequest(open=pb.OpenSession(session_id="session-tok-1", start_layer=0, end_layer=2,
                                                   batch_size=1, max_length=8))
    expect_status(stub, [bare], grpc.StatusCode.UNAUTHENTICATED, "needs a token")
    elsewhere = open_session({"peer_id": "bpSomebodyElse"}, "session-tok-2", start_layer=0, end_layer=2,
                             batch_size=1, max_length=8)
    expect_status(stub, [elsewhere], grpc.StatusCode.UNAUTHENTICATED, "addressed to")
    moved = open_request("session-tok-3")
    moved.open.session_id = "session-tok-4"  # a token bound to another session id
    expect_status(stub, [moved], grpc.StatusCode.UNAUTHENTICATED, "does not verify")
    used = open_request("session-tok-5")
    run_stream(stub, [used])
    expect_status(stub, [used], grpc.StatusCode.UNAUTHENTICATED, "already used")
