"""Tiny random checkpoints of each supported family, built locally from a fixed seed.

Transformers' default init (std 0.02) makes a random model repeat one greedy token, which would
make parity tests pass for the wrong reason; std 0.25 makes tokens vary, and ``build_checkpoint``
checks that they do.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from brigade.peer.launcher import LocalSwarm

# Peers on a 2-core machine take turns; two threads each is the most that helps.
PEER_THREADS = int(os.environ.get("BRIGADE_TEST_PEER_THREADS", "2"))
FAST_PEER_ARGS = ["--drain-grace", "1", "--announce-period", "1.5", "--record-ttl", "4"]



FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}

TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=512,
    initializer_range=0.25,
    eos_token_id=None,  # random models hit EOS at random; the EOS path has its own test
    bos_token_id=None,
    pad_token_id=None,
)


def build_model(family: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    config_class, model_class, family_options = FAMILIES[family]
    config = config_class(**{**TINY_SHAPE, **family_options, **overrides})
    torch.manual_seed(seed)
    return model_class(config).eval()


def build_checkpoint(
    folder: Path, family: str = "llama", seed: int = 0, shard_size: str | None = None, **overrides: object
) -> Path:
    """Saves a tiny random model of ``family`` in ``folder`` (sharded when ``shard_size`` is given)."""
    model = build_model(family, seed, **overrides)
    assert_tokens_vary(model)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def assert_tokens_vary(model: PreTrainedModel, new_tokens: int = 32) -> None:
    prompt = torch.arange(1, 9)[None]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    distinct = len(set(out[0, prompt.shape[1] :].tolist()))
    assert distinct >= new_tokens // 4, (
        f"greedy output repeats itself ({distinct} distinct tokens): raise the init scale"
    )


def start_swarm(folder: Path, checkpoint: Path, spans: list[tuple[int, int]]) -> LocalSwarm:
    swarm = LocalSwarm(folder, peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        launched = [swarm.add_peer(str(checkpoint), span, extra_args=FAST_PEER_ARGS, wait=False) for span in spans]
        for peer in launched:
            swarm.wait_ready(peer)
    except BaseException:
        swarm.close()
        raise
    return swarm
