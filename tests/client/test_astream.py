"""``astream``: the async, cancellable core of streaming, against the shared tiny-Llama swarm."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from brigade_peer_client import peer_channel
from brigade_testkit import build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def model(llama_swarm: LocalSwarm, llama_checkpoint: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(str(llama_checkpoint), llama_swarm.initial_peers) as model:
        yield model


def open_sessions(swarm: LocalSwarm) -> int:
    total = 0
    for peer in swarm.peers:
        with peer_channel(peer.info) as channel:
            total += pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=5).open_sessions
    return total


def test_astream_gives_streams_tokens_and_runs_concurrently(model: DistributedModelForCausalLM) -> None:
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(8))
    expected = build_model("llama", seed=0).generate(ids, max_new_tokens=10, do_sample=False)[:, 9:]
    assert torch.stack(list(model.stream(ids, max_new_tokens=10)), 1).tolist() == expected.tolist()

    async def collect(row: torch.Tensor) -> list[int]:
        return [int(tokens[0]) async for tokens in model.astream(row, max_new_tokens=10)]

    async def both() -> list[list[int]]:
        return await asyncio.gather(collect(ids[:1]), collect(ids[1:]))

    assert asyncio.run(both()) == expected.tolist()


def test_a_consumer_that_stops_or_is_cancelled_closes_its_session(
    model: DistributedModelForCausalLM, llama_swarm: LocalSwarm
) -> None:
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(9))

    async def stop_early() -> int:
        stream = model.astream(ids, max_new_tokens=400)
        async for _ in stream:
            break
        during = open_sessions(llama_swarm)
        await stream.aclose()  # returns once every hop is closed
        return during

    async def cancel() -> int:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in model.astream(ids, max_new_tokens=400):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        during = open_sessions(llama_swarm)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return during

    for scenario in (stop_early, cancel):
        assert asyncio.run(scenario()) == len(llama_swarm.peers), "one session per peer while generating"
        deadline = time.monotonic() + 3
        while open_sessions(llama_swarm) and time.monotonic() < deadline:
            time.sleep(0.02)  # the peer notices a cancelled stream within milliseconds
        assert open_sessions(llama_swarm) == 0
