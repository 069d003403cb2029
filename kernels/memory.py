"""How much memory a span of layers and its KV cache take, computed from the config alone.

A peer decides how many layers to host before it loads any: it has a memory budget, a dtype and
a quantization, and it must leave room for the KV cache of the sessions it will serve. Everything
here is arithmetic over a family's args (the shapes of one decoder layer come from building it on
the meta device, which allocates nothing), so it is cheap enough to run for every candidate span
and gives the same answer on a machine without the checkpoint or a GPU.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from torch import nn

from brigade.kernels.span import ModelArgs

QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCKSIZE = 64  # weights per absmax block, as kernels/quant.py quantizes them
SCALE_BYTES = 4  # int8 row scales and nf4 block absmax are fp32

GIB = 1 << 30


def _llama3(hidden: int, intermediate: int, layers: int, heads: int) -> Any:
    """A Llama-3 shape: what differs between sizes is passed, the rest all sizes share."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def LLAMA3_8B() -> Any:
    """The published shape of Meta-Llama-3-8B, built in code so planning needs no download."""
    return _llama3(hidden=4096, intermediate=14336, layers=32, heads=32)


def LLAMA3_70B() -> Any:
    """The published shape of Meta-Llama-3-70B, built in code so planning needs no download."""
    return _llama3(hidden=8192, intermediate=28672, layers=80, heads=64)


def MIXTRAL_8X7B() -> Any:
    """The published shape of Mixtral-8x7B-v0.1: 8 experts per layer, 2 active per token."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
        tie_word_embeddings=False,
    )


@functools.lru_cache(maxsize=64)
def _layer_shapes(args: ModelArgs) -> tuple[tuple[tuple[int, int], ...], int]:
    """(out, in) of every linear weight of one decoder layer, and how many other parameters it has.

    The layer is built on the meta device from the family's own class, so the count follows the
    family's code (fused projections, experts, biases, norms) without being written twice.
    """
    from brigade.kernels.families import family_for_model_type

    with torch.device("meta"):
        layer = family_for_model_type(args.model_type).span_class.layer_class(args, 0)
    shapes = tuple((m.out_features, m.in_features) for m in layer.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in layer.parameters())
    return shapes, total - sum(rows * columns for rows, columns in shapes)


def layer_parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters of one decoder layer: ``linear`` (every linear weight) and ``other``.

    They are split because quantization only touches the linear weights; norms, biases and a
    mixture of experts' router stay at the compute dtype.
    """
    shapes, other = _layer_shapes(args)
    return {"linear": sum(rows * columns for rows, columns in shapes), "other": other}


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")


def _check_dtype_bytes(dtype_bytes: int) -> None:
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"dtype_bytes must be the element size of a dtype (1, 2, 4 or 8), got {dtype_bytes}")


def layer_bytes(args: ModelArgs, dtype_bytes: int, quantization: str) -> int:
    """Bytes one decoder layer's weights take at ``dtype_bytes`` per element and ``quantization``.

    Assumptions, following how bitsandbytes stores what kernels/quant.py builds:

    - ``none``: every parameter at ``dtype_bytes``.
    - ``int8``: each linear weight is 1 byte per element plus one fp32 scale per output row.
    - ``nf4``: each linear weight is packed two per byte (rounded up per tensor) plus one fp32
      absmax per block of 64 weights (the block count rounded up per tensor). With bitsandbytes'
      double quantization (``Params4bit``'s default ``compress_statistics=True``) the absmax
      takes 1 byte instead, plus one fp32 per 256 blocks, so a real nf4 layer is up to ~9%
      smaller than this: the plan errs on the safe side.
    - Norms and biases stay at ``dtype_bytes`` in every case.

    Not counted, because they are per span or per process rather than per layer: the rotary
    frequencies (``head_dim / 2`` fp32 values per span), the 16-entry nf4 code tables,
    activations, CUDA context and allocator slack. ``plan_span``'s ``overhead_bytes`` is for those.
    """
    _check_quantization(quantization)
    _check_dtype_bytes(dtype_bytes)
    counts = layer_parameter_counts(args)
    other = counts["other"] * dtype_bytes
    shapes = _layer_shapes(args)[0]
    if quantization == "none":
        return counts["linear"] * dtype_bytes + other
    if quantization == "int8":
        return sum(rows * columns + rows * SCALE_BYTES for rows, columns in shapes) + other
    return (
        sum(
            math.ceil(rows * columns / 2) + math.ceil(rows * columns / NF4_BLOCKSIZE) * SCALE_BYTES
            for rows, columns in shapes
        )
        + other
    )


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int, num_layers: int = 1) -> int:
    """Bytes of keys and values one position of one sequence takes over ``num_layers`` layers.

    With grouped-query attention only the ``num_kv_heads`` heads are cached, which is why a
    Llama-3 position costs a quarter or an eighth of what its head count suggests.
    """
    _check_dtype_bytes(dtype_bytes)
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    return 2 * args.num_kv_heads * args.head_dim * dtype_bytes * num_layers


def format_bytes(count: int) -> str:
    """``count`` in the largest binary unit that keeps it >= 1, with one decimal (``3.1 GiB``)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"



class PlanError(ValueError):
    """The budget cannot hold what was asked (a layer, a span with its cache): raise it or host less."""

@dataclass(frozen=True)
class SpanPlan:
    """How a peer splits its memory budget between layer weights and KV cache."""

    num_layers: int  # consecutive decoder layers to host
    weight_bytes: int  # bytes of those layers' weights
    cache_tokens: int  # positions (summed over all sessions and sequences) the KV cache can hold
    cache_bytes: int  # bytes of that KV cache over all hosted layers
    budget_bytes: int  # the whole budget the plan was made for, overhead included

    def describe(self) -> str:
        """One line for logs and the CLI, so operators see what their budget buys."""
        layers = "1 layer" if self.num_layers == 1 else f"{self.num_layers} layers"
        return (
            f"{layers} ({format_bytes(self.weight_bytes)} of weights) + KV cache for "
            f"{self.cache_tokens:,} positions ({format_bytes(self.cache_bytes)}) "
            f"in a {format_bytes(self.budget_bytes)} budget"
        )


def plan_span(
    args: ModelArgs,
    budget_bytes: int,
    dtype_bytes: int,
    quantization: str,
    *,
    cache_share: float = 0.25,
    overhead_bytes: int = 0,
    max_layers: int | None = None,
) -> SpanPlan:
    """The most consecutive layers that fit in a budget, and the KV cache the rest of it holds.

    Layers get ``(budget - overhead) * (1 - cache_share)``; the cache gets everything the layers
    leave, so capping ``max_layers`` gives the cache more room rather than wasting it. The cache
    is at ``dtype_bytes`` (the compute dtype) whatever the quantization of the weights.
    """
    _check_quantization(quantization)
    _check_dtype_bytes(dtype_bytes)
    if budget_bytes <= 0:
        raise ValueError(f"the memory budget must be positive, got {budget_bytes} bytes")
    if not 0.0 <= cache_share < 1.0:
        raise ValueError(f"cache_share must be in [0, 1), got {cache_share}")
    if overhead_bytes < 0:
        raise ValueError(f"overhead_bytes must be >= 0, got {overhead_bytes}")
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    usable = budget_bytes - overhead_bytes
    per_layer = layer_bytes(args, dtype_bytes, quantization)
    weight_room = int(max(usable, 0) * (1.0 - cache_share))
    limit = args.num_layers if max_layers is None else min(max_layers, args.num_layers)
    num_layers = min(weight_room // per_layer, limit)
    if num_layers < 1:
        raise PlanError(
            f"not even one layer fits: a layer takes {format_bytes(per_layer)} at {dtype_bytes} bytes per "
            f"element with quantization {quantization!r}, but only {format_bytes(max(weight_room, 0))} of the "
            f"{format_bytes(budget_bytes)} budget is left for weights (overhead {format_bytes(overhead_bytes)}, "
            f"cache share {cache_share:.0%}); raise the budget, quantize further or lower the cache share"
        )
    weight_bytes = num_layers * per_layer
    per_token = kv_bytes_per_token(args, dtype_bytes, num_layers)
    cache_tokens = (usable - weight_bytes) // per_token
    return SpanPlan(
        num_layers=num_layers,
        weight_bytes=weight_bytes,
        cache_tokens=cache_tokens,
        cache_bytes=cache_tokens * per_token,
        budget_bytes=budget_bytes,
    )


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"6GiB"``, ``"512 MiB"``, ``"8GB"``, ``"1.5 GiB"`` or ``"1000000"`` as a whole number of bytes.

    KB/MB/GB/TB are powers of 1000 and KiB/MiB/GiB/TiB powers of 1024, as on disk labels and in
    ``nvidia-smi`` respectively; units are case-insensitive. Bare ``G`` or ``M`` are refused
    because they mean 1000s to some tools and 1024s to others. Fractions round down to a byte.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size: expected a number with an optional unit, "
            "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '6GiB'"
        )
    try:
        amount = Decimal(match.group(1))
    except InvalidOperation as e:  # the pattern only lets numbers through; kept for safety
        raise ValueError(f"cannot read {text!r} as a size: {match.group(1)!r} is not a number") from e
    return int(amount * _UNITS[unit])
