"""Mixtral: Llama attention with a sparse mixture-of-experts MLP (each token runs its top-k experts).

The experts of a layer belong to that layer: a peer hosting layers 2:4 holds (and reads from the
checkpoint) exactly the experts of layers 2 and 3. Module names follow the published checkpoints
(``block_sparse_moe.gate``, ``block_sparse_moe.experts.{e}.w1/w2/w3``), so tensors load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brigade.kernels.batch import SegmentBatch
from brigade.kernels.llama import Attention, LlamaArgs
from brigade.kernels.span import RMSNorm, Rope, Span

MODEL_TYPES = ("mixtral",)


@dataclass(frozen=True)
class MixtralArgs(LlamaArgs):
    num_experts: int  # experts per layer
    experts_per_token: int  # top-k

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        return MODEL_TYPES

    @classmethod
    def extra_fields(cls, config: Any) -> dict[str, Any]:
        return dict(num_experts=config.num_local_experts, experts_per_token=config.num_experts_per_tok)


class Router(nn.Module):
    """Scores experts per token. Not an ``nn.Linear``, so quantization leaves the choice of experts exact."""

    def __init__(self, args: MixtralArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        self.top_k = args.experts_per_token

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)  # [N, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        return weights / weights.sum(dim=-1, keepdim=True), chosen


class Expert(nn.Module):
    def __init__(self, args: MixtralArgs):
        super().__init__()
        self.w1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, args: MixtralArgs):
        super().__init__()
        self.gate = Router(args)
        self.experts = nn.ModuleList(Expert(args) for _ in range(args.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x)  # [N, k] each
        out = torch.zeros_like(x)  # [N, H]
        for expert in chosen.unique().tolist():  # only the experts some token chose, in order
            rows, slot = torch.where(chosen == expert)  # tokens routed here, and where in their top-k
            y = self.experts[expert](x[rows]) * weights[rows, slot, None]  # [n, H]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: MixtralArgs, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, args.layer_windows[index])
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(args)

    def forward(self, x: torch.Tensor, rope: Rope, batch: SegmentBatch, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, layer)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralSpan(Span):
    args_class = MixtralArgs
    layer_class = DecoderLayer
    args: MixtralArgs
