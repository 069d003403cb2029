"""Streaming, EOS and missing layers, against the shared tiny-Llama swarm."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from brigade_testkit import build_model, start_swarm

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm
from brigade.protocol.errors import MissingLayersError

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def model(llama_swarm: LocalSwarm, llama_checkpoint: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(str(llama_checkpoint), llama_swarm.initial_peers) as model:
        yield model


@pytest.fixture(scope="module")
def reference():
    return build_model("llama", seed=0)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 512, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    return ids, mask


def test_stream_yields_the_generated_tokens_one_step_at_a_time(model: DistributedModelForCausalLM) -> None:
    ids, mask = prompts()
    steps = list(model.stream(ids, mask, max_new_tokens=8))
    assert len(steps) == 8 and all(step.shape == (3,) for step in steps)
    assert torch.stack(steps, 1).tolist() == model.generate(ids, mask, max_new_tokens=8)[:, 11:].tolist()


def test_eos_finishes_sequences_like_transformers(model: DistributedModelForCausalLM, reference) -> None:
    ids, mask = prompts()
    free_run = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    eos = int(free_run[0, ids.shape[1] + 4])  # a token the first sequence emits early
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = reference.generate(ids, attention_mask=mask, **options)
    got = model.generate(ids, attention_mask=mask, **options)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] <= expected.shape[1]


def test_right_padding_is_refused(model: DistributedModelForCausalLM) -> None:
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_missing_layers_are_named(tmp_path: Path, llama_checkpoint: Path) -> None:
    swarm = start_swarm(tmp_path / "partial", llama_checkpoint, [(0, 2), (4, 6)])
    try:
        with DistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), swarm.initial_peers, route_wait_s=1.0, retry_budget_s=3.0
        ) as model:
            began = time.monotonic()
            with pytest.raises(MissingLayersError, match="layers 2:4"):
                model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
            assert time.monotonic() - began < 3.0 + 2.0, "gave up later than the configured budget allows"
    finally:
        swarm.close()
