"""Llama-family decoder layers (Llama 2/3, Mistral, Qwen2, Qwen3) computed span by span with an explicit cache.

A span is ``layers[start:end]`` built from the same classes a full model would use; the cache,
positions and padding are passed in explicitly so the peer's session manager owns memory and the
layers stay pure compute. What differs inside the family is a few flags: biases (Qwen2 on q/k/v),
q/k norms (Qwen3), and each layer's sliding window (Mistral, Qwen's upper layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brigade.kernels.batch import SegmentBatch
from brigade.kernels.span import HeadSpec, ModelArgs, RMSNorm, Rope, Span, UnsupportedModelError, apply_rotary

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaArgs(ModelArgs):
    """The shape of a Llama-family model, read from its transformers config."""

    intermediate_size: int
    rms_norm_eps: float
    qkv_bias: bool  # biases on q, k and v
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over each head of q and k before rotary (Qwen3)

    @classmethod
    def from_config(cls, config: Any) -> LlamaArgs:
        model_type = getattr(config, "model_type", "")
        if model_type not in cls.model_types():
            raise UnsupportedModelError(
                f"model type {model_type!r} is not handled by {cls.__name__} ({', '.join(cls.model_types())})"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {config.hidden_act!r} is not supported; expected silu")
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            **ModelArgs.common(config),
            intermediate_size=config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
            # Qwen2 has biases on q/k/v only; Llama's and Qwen3's attention_bias covers all four projections.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type in ("llama", "qwen3"),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            **cls.extra_fields(config),
        )

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        return MODEL_TYPES

    @classmethod
    def extra_fields(cls, config: Any) -> dict[str, Any]:
        """Fields a subclass adds (Mixtral's experts)."""
        return {}

    def head(self) -> HeadSpec:
        return HeadSpec(make_norm=lambda: RMSNorm(self.hidden_size, self.rms_norm_eps))


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.window = window
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        rows = x.shape[0]  # x: [N, H], every session's new positions
        q = self.q_proj(x).view(rows, self.num_heads, self.head_dim)  # [N, heads, D]
        k = self.k_proj(x).view(rows, self.num_kv_heads, self.head_dim)  # [N, kv, D]
        v = self.v_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        return self.o_proj(batch.attend(layer, q, k, v, window=self.window))  # [N, H]


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [N, H]


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, args.layer_windows[index])
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaSpan(Span):
    """Decoder layers ``[start, end)`` of a Llama-family model."""

    args_class = LlamaArgs
    layer_class = DecoderLayer
    args: LlamaArgs
