"""Info counts the tasks on the peer's event loop, so that a soak run (benchmarks/soak.py) can tell a
peer that went back to idle from one that keeps a task per finished session.

An open Inference stream holds its handler's task; once the stream ends the count must come back
to what an idle peer shows.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brigade_inproc_peer import InProcessPeer
from brigade_peer_client import open_session, peer_stub

from brigade.peer.config import PeerConfig
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def peer(llama_checkpoint: Path) -> Iterator[InProcessPeer]:
    with InProcessPeer(llama_checkpoint, PeerConfig(model=str(llama_checkpoint), start_layer=0, end_layer=2)) as peer:
        yield peer


def _tasks(stub: pb_grpc.PeerStub) -> int:
    return stub.Info(pb.InfoRequest(), timeout=10).asyncio_tasks


def _settle(stub: pb_grpc.PeerStub, expected: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (tasks := _tasks(stub)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return tasks


def test_info_counts_a_streams_task_while_it_is_open_and_not_after(peer: InProcessPeer) -> None:
    channel, stub = peer_stub(peer.info)
    with channel:
        idle = _tasks(stub)
        assert idle >= 1  # at least the Info call's own task
        requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue(4)
        requests.put(open_session(peer.info, "session-tasks", start_layer=0, end_layer=2, batch_size=1, max_length=8))
        responses = stub.Inference(iter(requests.get, None), timeout=30)
        next(responses)  # opened: the stream's handler is running
        assert _tasks(stub) > idle
        requests.put(None)
        for _ in responses:
            pass
        assert _settle(stub, idle) == idle
