"""Llama-family decoder layers (Llama 2/3, Mistral, Qwen2) computed span by span with an explicit cache.

A span is ``layers[start:end]`` built from the same classes a full model would use; the cache,
positions and padding are passed in explicitly so the peer's session manager owns memory and the
layers stay pure compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brigade.kernels.batch import Segment, SegmentBatch
from brigade.kernels.cache import KVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")  # their frequencies depend on the sequence length


class UnsupportedModelError(ValueError):
    """The checkpoint's family or options are not implemented here."""


@dataclass(frozen=True)
class LlamaArgs:
    """The shape of a Llama-family model, read from its transformers config."""

    model_type: str
    num_layers: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None

    @classmethod
    def from_config(cls, config: Any) -> LlamaArgs:
        model_type = getattr(config, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") in UNSUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {rope['rope_type']!r} is not supported yet")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {config.hidden_act!r} is not supported; expected silu")
        num_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            num_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            # Qwen2 has biases on q/k/v only; Llama's attention_bias covers all four projections.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type == "llama",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            hidden_act="silu",
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_window=_active_sliding_window(config),
        )


def _active_sliding_window(config: Any) -> int | None:
    """The window when the config really uses one (Qwen2 carries a window it does not use)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the weight, as the reference implementation does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding; frequencies come from transformers' own rope helpers."""

    def __init__(self, config: Any, head_dim: int):
        super().__init__()
        rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = float(scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [N, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, D]; cos/sin: [N, D]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: SegmentBatch, layer: int
    ) -> torch.Tensor:
        rows = x.shape[0]  # x: [N, H], every session's new positions
        q = self.q_proj(x).view(rows, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # [N, heads, D]
        return self.o_proj(batch.attend(layer, q, k, v, window=self.window))  # [N, H]


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, batch: SegmentBatch, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaSpan(nn.Module):
    """Decoder layers ``[start, end)`` of a Llama-family model.

    ``layers[i]`` is global layer ``start + i``; its state-dict keys are ``layers.{i}.*``.
    """

    def __init__(self, config: Any, start: int, end: int):
        super().__init__()
        self.args = LlamaArgs.from_config(config)
        if not 0 <= start < end <= self.args.num_layers:
            raise ValueError(f"span {start}:{end} is not inside the model's {self.args.num_layers} layers")
        self.start, self.end = start, end
        self.layers = nn.ModuleList(DecoderLayer(self.args) for _ in range(start, end))
        self.rotary = Rotary(config, self.args.head_dim)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor,
        cache: KVCache | None = None,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Runs ``hidden`` ([B, T, H]) through global layers ``layers`` (default: the whole span).

        With a cache, the new positions start at ``cache.length``, their keys and values are
        written into it, and ``cache.length`` advances by T. ``pad_lengths`` ([B]) is each
        sequence's left padding, which is masked out as keys and shifts its positions.
        """
        return self.forward_segments([Segment(hidden, pad_lengths, cache)], layers)[0]

    @torch.inference_mode()
    def forward_segments(self, segments: list[Segment], layers: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """One pass of several sessions' new positions through ``layers``: one output per segment.

        Each segment keeps its own cache, offset and padding (see ``kernels/batch.py``); the
        projections and MLPs run once over all of their tokens together.
        """
        start, end = layers or (self.start, self.end)
        if not self.start <= start < end <= self.end:
            raise ValueError(f"layers {start}:{end} are not inside this span {self.start}:{self.end}")
        for seg in segments:
            cache = seg.cache
            total = (cache.length if cache is not None else 0) + seg.hidden.shape[1]
            if cache is not None and total > cache.capacity:
                raise ValueError(f"cache holds {cache.capacity} positions, step needs {total}")
        batch = SegmentBatch(segments)
        hidden = batch.flatten()  # [N, H]
        cos, sin = self.rotary(batch.positions, hidden.dtype)  # [N, D]
        for global_index in range(start, end):
            hidden = self.layers[global_index - self.start](hidden, cos, sin, batch, global_index)
        batch.advance()
        return batch.unflatten(hidden)
