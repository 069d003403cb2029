"""Speed features never change tokens: batching across sessions, forwarding on or off, pipelined prefill.

Runs on the shared 3-peer swarm (tiny Llama, layers 0:2, 2:4, 4:6). Greedy tokens are compared
with plain transformers, so every mode is checked against the same reference, not only against
each other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from brigade_peer_client import peer_stub
from brigade_testkit import build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return build_model("llama", seed=0)  # the llama_checkpoint fixture's model


@pytest.fixture(scope="module")
def model(llama_swarm: LocalSwarm, llama_checkpoint: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(str(llama_checkpoint), llama_swarm.initial_peers) as model:
        yield model


def greedy(reference: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        return reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False)[0].tolist()


def counters(swarm: LocalSwarm) -> list[tuple[int, int]]:
    """(passes, steps computed) of every peer, from its Info."""
    result = []
    for peer in swarm.peers:
        channel, stub = peer_stub(peer.info)
        with channel:
            info = stub.Info(pb.InfoRequest(), timeout=10)
        result.append((info.compute_passes, info.computed_steps))
    return result


def test_eight_concurrent_sessions_batched_match_each_alone(
    model: DistributedModelForCausalLM, reference: torch.nn.Module, llama_swarm: LocalSwarm
) -> None:
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (1, 3 + 2 * index), generator=generator) for index in range(8)]
    expected = [greedy(reference, prompt) for prompt in prompts]
    alone = [model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist() for prompt in prompts]
    assert alone == expected

    before = counters(llama_swarm)
    together: list[list[int] | None] = [None] * len(prompts)
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            together[index] = model.generate(prompts[index], max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        except BaseException as error:  # reported below, with the others' results
            failures.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert together == expected
    after = counters(llama_swarm)
    passes = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    steps = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    # 8 sessions x (1 prefill + 15 decode steps) x 3 peers were computed in far fewer passes.
    assert steps >= 8 * NEW_TOKENS * 3
    assert passes < 0.75 * steps, f"{passes} passes for {steps} steps: the peers did not batch"


def test_forwarding_on_and_off_give_the_same_tokens(
    llama_swarm: LocalSwarm, llama_checkpoint: Path, reference: torch.nn.Module
) -> None:
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(5))
    expected = greedy(reference, prompt, 24)
    for forwarding in (True, False):
        with DistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), llama_swarm.initial_peers, forwarding=forwarding
        ) as model:
            got = model.generate(prompt, max_new_tokens=24, do_sample=False)[0].tolist()
            links = list(model.last_forwarding)
        assert got == expected, f"forwarding={forwarding}"
        assert links == ([True, True, False] if forwarding else [False, False, False])


def test_long_prompts_move_in_chunks_with_and_without_pipelining(
    llama_swarm: LocalSwarm, llama_checkpoint: Path, reference: torch.nn.Module
) -> None:
    """A prompt longer than the peers' prefill chunk (128 in tests) crosses every hop in chunks: same tokens."""
    prompt = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(6))  # 3 chunks per hop
    expected = greedy(reference, prompt, 4)
    for options in ({"forwarding": True}, {"forwarding": False, "pipeline_prefill": True},
                    {"forwarding": False, "pipeline_prefill": False}):
        with DistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), llama_swarm.initial_peers, **options
        ) as model:
            assert model.generate(prompt, max_new_tokens=4, do_sample=False)[0].tolist() == expected, options
