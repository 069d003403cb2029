"""Tiny random checkpoints of each supported family, built locally from a fixed seed.

Transformers' default init (std 0.02) makes a random model repeat one greedy token, which would
make parity tests pass for the wrong reason; std 0.25 makes tokens vary, and ``build_checkpoint``
checks that they do.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from brigade.deploy.launcher import LaunchedProcess, LocalSwarm

# Peers on a 2-core machine take turns; two threads each is the most that helps.
PEER_THREADS = int(os.environ.get("BRIGADE_TEST_PEER_THREADS", "2"))
# Short record lifetimes so tests see changes fast; small prefill chunks so tests' prompts of a few
# hundred tokens already cross hops in several chunks (pipelined prefill).
FAST_PEER_ARGS = ["--drain-grace", "1", "--announce-period", "1.5", "--record-ttl", "4",
                  "--prefill-chunk-tokens", "128"]



WINDOW = 8  # sliding window of the tiny windowed models: shorter than the test prompts
# Untied: with tied embeddings scaled by sqrt(hidden), a random Gemma echoes its input token.
GEMMA = dict(head_dim=16, query_pre_attn_scalar=32, sliding_window=WINDOW, tie_word_embeddings=False)
# Gemma 3 layer types chosen so that the test spans 0:2 | 2:4 | 4:6 cut between a global and a
# sliding layer (at 2) and a sliding and a global one (at 4), and 2:4 is all sliding (a bounded cache).
GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                 "full_attention", "sliding_attention"]

# name -> (config class, model class, options over TINY_SHAPE)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "mistral_window": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    # Soft-caps low enough to bend this tiny model's scores and logits (Gemma 2 ships 50 and 30).
    "gemma2": (Gemma2Config, Gemma2ForCausalLM,
               {**GEMMA, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 5.0}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {**GEMMA, "layer_types": GEMMA3_LAYERS}),
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    # Falcon-40B's layout: grouped kv heads, parallel attention and MLP with two LayerNorms, tied head.
    "falcon": (FalconConfig, FalconForCausalLM, {
        "new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 160, "bias": False}),
    # ALiBi, fused per-head q/k/v, an embedding LayerNorm, tied head; 6 heads: not a power of two.
    "bloom": (BloomConfig, BloomForCausalLM, {"num_attention_heads": 6, "hidden_size": 96}),
}
WINDOWED_FAMILIES = ("mistral_window", "gemma2", "gemma3")

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


SEED_TRIES = 20  # a family prone to repeating itself (BLOOM) moves on to seed + 1000, + 2000, ... (deterministic)


def build_model(family: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """The tiny model of ``family`` from ``seed``, or from the first later seed whose greedy output varies."""
    config_class, model_class, family_options = FAMILIES[family]
    config = config_class(**{**TINY_SHAPE, **family_options, **overrides})
    for attempt in range(SEED_TRIES):
        torch.manual_seed(seed + 1000 * attempt)
        model = model_class(config).eval()
        if _distinct_greedy(model) >= 32 // 4:
            break
    return model


def _distinct_greedy(model: PreTrainedModel, new_tokens: int = 32) -> int:
    prompt = torch.arange(1, 9)[None]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    return len(set(out[0, prompt.shape[1] :].tolist()))


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
    distinct = _distinct_greedy(model, new_tokens)
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


class ChaosSwarm:
    """Layers covered twice with different boundaries, and the means to break and heal peers.

    Spans for L layers: [0, L/2) twice, [L/2, L) twice, and [L/4, 3L/4) once, so a failed hop's
    replacement may be one peer or two.
    """

    def __init__(self, folder: Path, checkpoint: Path, num_layers: int, peer_args: list[str] | None = None):
        half, quarter = num_layers // 2, num_layers // 4
        self.spans = [(0, half), (0, half), (half, num_layers), (half, num_layers), (quarter, half + quarter)]
        self.num_layers = num_layers
        self.swarm = LocalSwarm(folder / "logs", peer_threads=PEER_THREADS)
        self.checkpoint = checkpoint
        self.folder = folder
        self.peer_args = FAST_PEER_ARGS if peer_args is None else peer_args

    def start(self) -> None:
        self.swarm.start_bootstrap()
        for index, span in enumerate(self.spans):
            args = [*self.peer_args, "--identity", str(self.folder / f"peer{index}.key"), "--drain-grace", "20"]
            self.swarm.add_peer(str(self.checkpoint), span, extra_args=args, wait=False)
        for peer in self.swarm.peers:
            self.swarm.wait_ready(peer)

    def by_id(self) -> dict[str, LaunchedProcess]:
        return {str(peer.info["peer_id"]): peer for peer in self.swarm.peers if peer.info}

    def alive_spans(self, without: LaunchedProcess | None = None) -> list[tuple[int, int]]:
        return [span for peer, span in zip(self.swarm.peers, self.spans, strict=True)
                if peer.alive() and peer is not without]

    def removable(self, peer: LaunchedProcess) -> bool:
        """True when every layer keeps a live peer without this one."""
        covered = set()
        for start, end in self.alive_spans(without=peer):
            covered.update(range(start, end))
        return covered == set(range(self.num_layers))

    def pick_victim(self, route: list[str], rng: random.Random) -> LaunchedProcess | None:
        """A live peer on the current route whose loss leaves the layers covered (any live one otherwise)."""
        by_id = self.by_id()
        on_route = [by_id[hop.split("[")[0]] for hop in route if hop.split("[")[0] in by_id]
        for pool in (on_route, self.swarm.peers):
            candidates = [peer for peer in pool if peer.alive() and self.removable(peer)]
            if candidates:
                return rng.choice(candidates)
        return None

    def heal(self) -> None:
        """Restarts every peer that is not running (same identity), and wakes stopped ones."""
        stopped = [peer for peer in self.swarm.peers if not peer.alive()]
        for peer in stopped:
            self.swarm.restart(peer, wait=False)
        for peer in stopped:
            self.swarm.wait_ready(peer)
