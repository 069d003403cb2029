"""Gemma 2 and Gemma 3 (text) decoder layers.

What sets them apart from Llama: norms scale by ``1 + weight`` and wrap both the attention and
the MLP (four per layer), the MLP uses tanh-approximated GELU, attention scores are scaled by
``query_pre_attn_scalar ** -0.5``, and layers alternate between sliding-window and global
attention (``layer_types``). Gemma 2 soft-caps attention scores; Gemma 3 normalizes q and k per
head instead and gives its local and global layers different rotary frequencies. The client
scales embeddings by ``sqrt(hidden)`` and (Gemma 2) soft-caps the final logits: see ``head()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brigade.kernels.batch import SegmentBatch
from brigade.kernels.span import (
    HeadSpec,
    ModelArgs,
    Rope,
    Rotary,
    Span,
    UnsupportedModelError,
    apply_rotary,
)

MODEL_TYPES = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class GemmaArgs(ModelArgs):
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool
    scale: float  # attention score scale, query_pre_attn_scalar ** -0.5
    attn_softcap: float | None  # Gemma 2: scores become c * tanh(scores / c)
    final_softcap: float | None
    qk_norm: bool  # Gemma 3
    rope_per_layer_type: bool  # Gemma 3: local and global layers have their own rotary settings
    layer_types: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Any) -> GemmaArgs:
        model_type = getattr(config, "model_type", "")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(f"model type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if activation != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"activation {activation!r} is not supported; expected gelu_pytorch_tanh")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("bidirectional attention (an embedding model) is not supported")
        gemma3 = model_type == "gemma3_text"
        return cls(
            **ModelArgs.common(config),
            intermediate_size=config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            scale=config.query_pre_attn_scalar**-0.5,
            # Gemma 3 configs carry attn_logit_softcapping, but its attention never applies it.
            attn_softcap=None if gemma3 else getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            qk_norm=gemma3,
            rope_per_layer_type=gemma3,
            layer_types=tuple(config.layer_types),
        )

    def head(self) -> HeadSpec:
        return HeadSpec(
            make_norm=lambda: GemmaRMSNorm(self.hidden_size, self.rms_norm_eps),
            embed_scale=self.hidden_size**0.5,
            final_softcap=self.final_softcap,
        )


class GemmaRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from 1, computed in fp32 throughout."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: GemmaArgs, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.window, self.scale, self.softcap = window, args.scale, args.attn_softcap
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=bias)
        if args.qk_norm:
            self.q_norm = GemmaRMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        rows = x.shape[0]  # x: [N, H]
        q = self.q_proj(x).view(rows, self.num_heads, self.head_dim)  # [N, heads, D]
        k = self.k_proj(x).view(rows, self.num_kv_heads, self.head_dim)  # [N, kv, D]
        v = self.v_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = batch.attend(layer, q, k, v, window=self.window, scale=self.scale, softcap=self.softcap)
        return self.o_proj(out)  # [N, H]


class MLP(nn.Module):
    def __init__(self, args: GemmaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: GemmaArgs, index: int):
        super().__init__()
        size, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = Attention(args, args.layer_windows[index])
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = MLP(args)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, batch, layer))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaSpan(Span):
    args_class = GemmaArgs
    layer_class = DecoderLayer
    args: GemmaArgs

    def make_rotaries(self) -> nn.ModuleDict:
        if not self.args.rope_per_layer_type:
            return super().make_rotaries()
        return nn.ModuleDict({kind: Rotary(self.config, self.args.head_dim, kind)
                              for kind in sorted(set(self.args.layer_types))})

    def rotary_kind(self, index: int) -> str:
        return self.args.layer_types[index] if self.args.rope_per_layer_type else "default"
