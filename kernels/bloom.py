"""BLOOM decoder layers: ALiBi positions, a fused per-head q/k/v projection, LayerNorms with biases.

The family Petals was built for. Where it differs from the rotary families: no rotary embedding
(each attention score gains ``slope[head] * key_position``, ALiBi), one ``query_key_value``
projection whose output interleaves q, k and v per head (``[heads, 3, D]``), biases everywhere,
Megatron's tanh GELU, and ``apply_residual_connection_post_layernorm`` choosing whether the
residual is the layer's input or its normalized input. The client applies a LayerNorm right after
the embeddings (``word_embeddings_layernorm``) and ties the LM head to them.

Published BLOOM checkpoints were saved from the bare model, so their tensors have no
``transformer.`` prefix (``h.3.mlp...``, ``word_embeddings.weight``); checkpoints saved by newer
transformers have it. Both load (``families.py`` matches either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from brigade.kernels.batch import SegmentBatch
from brigade.kernels.span import HeadSpec, ModelArgs, Rope, Span, UnsupportedModelError

MODEL_TYPES = ("bloom",)
ALIBI_MAX_POSITIONS = 131072  # ALiBi has no table to run out of; a session's length is the peer's to cap


@dataclass(frozen=True)
class BloomArgs(ModelArgs):
    layer_norm_eps: float
    residual_post_norm: bool  # apply_residual_connection_post_layernorm

    @classmethod
    def from_config(cls, config: Any) -> BloomArgs:
        if getattr(config, "model_type", "") not in MODEL_TYPES:
            raise UnsupportedModelError(f"model type {config.model_type!r} is not bloom")
        heads = config.n_head
        if config.hidden_size % heads:
            raise UnsupportedModelError(f"hidden_size {config.hidden_size} is not a multiple of n_head {heads}")
        return cls(
            model_type=config.model_type,
            num_layers=config.n_layer,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=config.hidden_size // heads,
            max_position_embeddings=ALIBI_MAX_POSITIONS,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            layer_windows=(None,) * config.n_layer,
            rope_by_length=False,
            layer_norm_eps=config.layer_norm_epsilon,
            residual_post_norm=bool(config.apply_residual_connection_post_layernorm),
        )

    def head(self) -> HeadSpec:
        return HeadSpec(
            make_norm=lambda: nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps),
            embed="transformer.word_embeddings.weight",
            norm="transformer.ln_f",
            embed_norm="transformer.word_embeddings_layernorm",
        )


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes [heads], as BLOOM computes them (geometric; interleaved past a power of 2)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.full((), 2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """Megatron's tanh approximation of GELU, with BLOOM's own constants."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class Attention(nn.Module):
    def __init__(self, args: BloomArgs):
        super().__init__()
        self.num_heads, self.head_dim = args.num_heads, args.head_dim
        self.query_key_value = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        with torch.device("cpu"):  # a few numbers: never on the meta device a span is built in
            self.register_buffer("slopes", alibi_slopes(args.num_heads), persistent=False)

    def forward(self, x: torch.Tensor, batch: SegmentBatch, layer: int) -> torch.Tensor:
        rows = x.shape[0]  # x: [N, H]
        fused = self.query_key_value(x).view(rows, self.num_heads, 3, self.head_dim)  # per head: q, k, v
        q, k, v = fused[:, :, 0], fused[:, :, 1].contiguous(), fused[:, :, 2].contiguous()  # [N, heads, D]
        return self.dense(batch.attend(layer, q, k, v, alibi=self.slopes))  # [N, H]


class MLP(nn.Module):
    def __init__(self, args: BloomArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, 4 * args.hidden_size, bias=True)
        self.dense_4h_to_h = nn.Linear(4 * args.hidden_size, args.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: BloomArgs, index: int):
        super().__init__()
        self.residual_post_norm = args.residual_post_norm
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attention = Attention(args)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: Rope | None, batch: SegmentBatch, layer: int) -> torch.Tensor:
        normed = self.input_layernorm(x)
        x = self.self_attention(normed, batch, layer) + (normed if self.residual_post_norm else x)
        normed = self.post_attention_layernorm(x)
        return self.mlp(normed) + (normed if self.residual_post_norm else x)


class BloomSpan(Span):
    args_class = BloomArgs
    layer_class = DecoderLayer
    args: BloomArgs

    def make_rotaries(self) -> nn.ModuleDict:
        return nn.ModuleDict()  # ALiBi: positions enter as biases on the scores, not as rotations

    def rotary_kind(self, index: int) -> str | None:
        return None
