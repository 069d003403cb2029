"""The KV cache pool is bounded: full means a clear RESOURCE_EXHAUSTED, never a crash, and pages come back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from brigade_peer_client import open_session, peer_stub
from brigade_testkit import PEER_THREADS

from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode

POOL = 256  # positions; pages of 64
HIDDEN = 64
PEER: dict[str, object] = {}  # the ready line of the peer under test, set by the fixture


@pytest.fixture(scope="module")
def stub(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.PeerStub]:
    swarm = LocalSwarm(tmp_path_factory.mktemp("pool"), peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        peer = swarm.add_peer(str(llama_checkpoint), (0, 6), extra_args=[
            "--cache-tokens", str(POOL), "--session-idle-timeout", "1.5", "--drain-grace", "1",
            "--client-cache-share", "1.0"])
        PEER.update(peer.info)
        channel, stub = peer_stub(PEER)
        with channel:
            yield stub
    finally:
        swarm.close()


class Session:
    """A hand-driven stream: open, then steps one at a time, reading each answer."""

    def __init__(self, stub: pb_grpc.PeerStub, session_id: str, max_length: int, wait_s: float = 0.0):
        self._requests: list[pb.InferenceRequest] = []
        self._queue = __import__("queue").Queue()
        self.session_id = session_id
        self.position = 0
        self._responses = stub.Inference(iter(self._queue.get, None), timeout=60)
        # each session its own client identity: these tests are about the pool, not per-client shares
        self._queue.put(open_session(PEER, session_id, identity=Identity.generate(), start_layer=0, end_layer=6,
                                     batch_size=1, max_length=max_length, open_timeout_s=wait_s))
        next(self._responses)

    def step(self, length: int) -> int:
        self._queue.put(pb.InferenceRequest(session_id=self.session_id, step=pb.Step(
            hidden=encode(torch.randn(1, length, HIDDEN)), start_position=self.position)))
        result = next(self._responses).result
        self.position = result.length
        return result.length

    def close(self) -> None:
        self._queue.put(None)
        for _ in self._responses:
            pass


def free_tokens(stub: pb_grpc.PeerStub) -> int:
    return stub.Info(pb.InfoRequest(), timeout=10).free_cache_tokens


def wait_for_free(stub: pb_grpc.PeerStub, expected: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while free_tokens(stub) != expected:
        assert time.monotonic() < deadline, f"free cache stayed at {free_tokens(stub)}, expected {expected}"
        time.sleep(0.05)


def test_full_pool_refuses_new_sessions_clearly_while_others_keep_working(stub: pb_grpc.PeerStub) -> None:
    first = Session(stub, "session-big-1", max_length=POOL)
    assert first.step(200) == 200  # grows to the whole pool
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        Session(stub, "session-late-1", max_length=64, wait_s=0.5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "0 of 256 are free" in caught.value.details()
    assert time.monotonic() - began >= 0.45, "the new session should have waited for its timeout"
    assert first.step(1) == 201  # the earlier session is untouched
    first.close()
    wait_for_free(stub, POOL)


def test_waiting_session_is_admitted_when_pages_free_up(stub: pb_grpc.PeerStub) -> None:
    import threading

    first = Session(stub, "session-big-2", max_length=POOL)
    first.step(200)
    threading.Timer(0.3, first.close).start()
    late = Session(stub, "session-late-2", max_length=64, wait_s=10.0)  # admitted once the first closes
    assert late.step(3) == 3
    late.close()
    wait_for_free(stub, POOL)


def test_a_running_session_that_cannot_grow_gets_a_clear_error(stub: pb_grpc.PeerStub) -> None:
    a, b = Session(stub, "session-half-a", max_length=POOL), Session(stub, "session-half-b", max_length=POOL)
    a.step(128)
    b.step(128)
    with pytest.raises(grpc.RpcError) as caught:
        a.step(64)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV cache is full" in caught.value.details()
    assert b.step(1) == 129  # the other session is fine
    b.close()
    wait_for_free(stub, POOL)


def test_idle_session_expires_and_frees_its_pages(stub: pb_grpc.PeerStub) -> None:
    idle = Session(stub, "session-idle-1", max_length=POOL)
    idle.step(100)
    assert free_tokens(stub) < POOL
    wait_for_free(stub, POOL, timeout_s=5.0)  # the peer's idle timeout is 1.5 s
    with pytest.raises(grpc.RpcError) as caught:
        idle.step(1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_fifty_sessions_leave_the_pool_as_it_was(stub: pb_grpc.PeerStub) -> None:
    before = free_tokens(stub)
    for index in range(50):
        session = Session(stub, f"session-churn-{index:02d}", max_length=128)
        session.step(1 + index % 70)
        session.close()
    wait_for_free(stub, before)
