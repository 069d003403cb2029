"""Phi-3 (and Phi-4-mini, which shares the model type): Llama's layer with fused projections.

q, k and v come out of one ``qkv_proj`` and gate and up out of one ``gate_up_proj`` (one matmul
each, loaded as stored). Rotary may cover only part of each head (``partial_rotary_factor``),
and a config's ``sliding_window`` applies to every layer. LongRoPE (Phi-3.5, the 128k variants)
changes its frequencies with the sequence length (``kernels/rope.py``), and generation recomputes
the whole sequence once it first grows past ``original_max_position_embeddings``, as transformers'
Phi-3 does (``recompute_at``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brigade.kernels.batch import SegmentBatch
from brigade.kernels.span import HeadSpec, ModelArgs, RMSNorm, Rope, Span, UnsupportedModelError, apply_rotary

MODEL_TYPES = ("phi3",)


@dataclass(frozen=True)
class Phi3Args(ModelArgs):
    intermediate_size: int
    rms_norm_eps: float
    original_max_positions: int | None  # where generation recomputes the whole sequence (see recompute_at)

    @classmethod
    def from_config(cls, config: Any) -> Phi3Args:
        if getattr(config, "model_type", "") not in MODEL_TYPES:
            raise UnsupportedModelError(f"model type {config.model_type!r} is not phi3")
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"activation {config.hidden_act!r} is not supported; expected silu")
        original = getattr(config, "original_max_position_embeddings", None)
        return cls(**ModelArgs.common(config), intermediate_size=config.intermediate_size,
                   rms_norm_eps=config.rms_norm_eps, original_max_positions=int(original) if original else None)

    def head(self) -> HeadSpec:
        return HeadSpec(make_norm=lambda: RMSNorm(self.hidden_size, self.rms_norm_eps))

    def recompute_at(self) -> int | None:
        return self.original_max_positions


class Attention(nn.Module):
    def __init__(self, args: Phi3Args, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.window = window
        width = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        rows = x.shape[0]  # x: [N, H]
        qkv = self.qkv_proj(x).view(rows, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)  # [N, heads|kv, D]
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        return self.o_proj(batch.attend(layer, q, k, v.contiguous(), window=self.window))  # [N, H]


class MLP(nn.Module):
    def __init__(self, args: Phi3Args):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [N, I] each
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, args: Phi3Args, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, args.layer_windows[index])
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Span(Span):
    args_class = Phi3Args
    layer_class = DecoderLayer
    args: Phi3Args
