"""Falcon decoder layers (rotary variants: Falcon 7B/40B/180B, Falcon 2 11B).

A Falcon layer projects q, k and v with one fused ``query_key_value`` whose layout depends on
the architecture: the "new decoder architecture" (40B, 180B, 11B) groups each kv head with its
query heads (``[kv, heads/kv + 2, D]``), multi-query (7B) puts one k and one v after all the
queries, and the original layout interleaves q, k, v per head. Attention and MLP usually run in
parallel on the same input (``parallel_attn``), with one LayerNorm or two (``ln_attn``,
``ln_mlp``). Norms are LayerNorms with a bias. ALiBi variants (falcon-rw) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brigade.kernels.batch import SegmentBatch
from brigade.kernels.span import HeadSpec, ModelArgs, Rope, Span, UnsupportedModelError, apply_rotary

MODEL_TYPES = ("falcon",)
QKV_LAYOUTS = ("grouped", "multi_query", "interleaved")


@dataclass(frozen=True)
class FalconArgs(ModelArgs):
    ffn_hidden_size: int
    layer_norm_eps: float
    bias: bool
    qkv_layout: str  # one of QKV_LAYOUTS
    parallel_attn: bool  # attention and MLP both read the layer's input
    two_norms: bool  # parallel with separate ln_attn / ln_mlp (new decoder architecture)

    @classmethod
    def from_config(cls, config: Any) -> FalconArgs:
        if getattr(config, "model_type", "") not in MODEL_TYPES:
            raise UnsupportedModelError(f"model type {config.model_type!r} is not falcon")
        if getattr(config, "alibi", False):
            raise UnsupportedModelError("Falcon with ALiBi positions (falcon-rw) is not supported; rotary Falcon is")
        if config.activation != "gelu":
            raise UnsupportedModelError(f"activation {config.activation!r} is not supported; expected gelu")
        new_arch = bool(config.new_decoder_architecture)
        if new_arch and not config.parallel_attn:
            raise UnsupportedModelError("Falcon's new decoder architecture without parallel attention is not supported")
        heads = config.num_attention_heads
        if new_arch:
            layout, kv_heads = "grouped", config.num_kv_heads
        elif config.multi_query:
            layout, kv_heads = "multi_query", 1
        else:
            layout, kv_heads = "interleaved", heads
        num_norms = config.num_ln_in_parallel_attn or (2 if new_arch else 1)
        common = ModelArgs.common(config)
        common.update(num_kv_heads=kv_heads, head_dim=config.hidden_size // heads)
        return cls(
            **common,
            ffn_hidden_size=config.ffn_hidden_size,
            layer_norm_eps=config.layer_norm_epsilon,
            bias=bool(config.bias),
            qkv_layout=layout,
            parallel_attn=bool(config.parallel_attn),
            two_norms=new_arch and num_norms == 2,
        )

    def head(self) -> HeadSpec:
        return HeadSpec(
            make_norm=lambda: nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps),
            embed="transformer.word_embeddings.weight",
            norm="transformer.ln_f",
        )


class Attention(nn.Module):
    def __init__(self, args: FalconArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.layout = args.qkv_layout
        width = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
        self.query_key_value = nn.Linear(args.hidden_size, width, bias=args.bias)
        self.dense = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.bias)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, heads, D], k and v [N, kv, D] out of the fused projection [N, width]."""
        rows, heads, kv, dim = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.layout == "grouped":  # per kv head: its heads/kv queries, then its k, then its v
            grouped = qkv.view(rows, kv, heads // kv + 2, dim)
            return grouped[:, :, :-2].reshape(rows, heads, dim), grouped[:, :, -2], grouped[:, :, -1]
        if self.layout == "multi_query":  # all queries, then the one k, then the one v
            fused = qkv.view(rows, heads + 2, dim)
            return fused[:, :heads], fused[:, heads:-1], fused[:, -1:]
        fused = qkv.view(rows, heads, 3, dim)  # interleaved: q, k, v of head 0, then of head 1, ...
        return fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        q, k, v = self.split(self.query_key_value(x))  # x: [N, H]
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        return self.dense(batch.attend(layer, q, k.contiguous(), v.contiguous()))  # [N, H]


class MLP(nn.Module):
    def __init__(self, args: FalconArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, args.ffn_hidden_size, bias=args.bias)
        self.dense_4h_to_h = nn.Linear(args.ffn_hidden_size, args.hidden_size, bias=args.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: FalconArgs, index: int):
        super().__init__()
        size, eps = args.hidden_size, args.layer_norm_eps
        self.parallel, self.two_norms = args.parallel_attn, args.two_norms
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(size, eps=eps)
            self.ln_mlp = nn.LayerNorm(size, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(size, eps=eps)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(size, eps=eps)
        self.self_attention = Attention(args)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        if not self.parallel:
            x = x + self.self_attention(self.input_layernorm(x), rope, batch, layer)
            return x + self.mlp(self.post_attention_layernorm(x))
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        return x + (self.mlp(mlp_in) + self.self_attention(attn_in, rope, batch, layer))


class FalconSpan(Span):
    args_class = FalconArgs
    layer_class = DecoderLayer
    args: FalconArgs
