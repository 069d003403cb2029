"""Memory per layer and per cached position, and how many layers fit a peer's budget.

    python benchmarks/memory.py

Part one is arithmetic over the published Llama-3-8B, Llama-3-70B and Mixtral-8x7B shapes
(kernels/memory.py, no download): bytes per decoder layer and KV bytes per position at fp32, bf16,
int8 and nf4, and the span a peer with 8, 24 or 80 GiB would host with a quarter of its budget
kept for the cache. A Mixtral layer holds all 8 of its experts (a peer serves whole layers), so a
layer weighs ~6.7x a Llama-3-8B one while its KV cache per position is the same.
Part two checks that arithmetic against a small Llama and a small Mixtral checkpoint built here
(random weights, fixed seed) and loaded with the real loader (and quantizer), so a
mismatch between the planner and what peers really allocate shows up as a relative difference.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.utils import logging as transformers_logging

from brigade.kernels.cache import KVCache
from brigade.kernels.families import model_args
from brigade.kernels.loading import load_span
from brigade.kernels.memory import (
    GIB,
    LLAMA3_8B,
    LLAMA3_70B,
    MIXTRAL_8X7B,
    format_bytes,
    kv_bytes_per_token,
    layer_bytes,
    plan_span,
)
from brigade.kernels.quant import module_bytes, quantize_span

BUDGETS_GIB = (8, 24, 80)
SMALL_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)


@dataclass(frozen=True)
class Setting:
    """How weights are stored; the KV cache and norms stay at the compute dtype."""

    name: str
    dtype: torch.dtype  # compute dtype: norms, biases, activations and the KV cache
    quantization: str  # of the linear weights

    @property
    def dtype_bytes(self) -> int:
        return self.dtype.itemsize


SETTINGS = (
    Setting("fp32", torch.float32, "none"),
    Setting("bf16", torch.bfloat16, "none"),
    Setting("int8", torch.bfloat16, "int8"),
    Setting("nf4", torch.bfloat16, "nf4"),
)


def _positions(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.0f}k" if count >= 10_000 else f"{count:,}"


def print_planned(name: str, config: Any) -> None:
    args = model_args(config)
    experts = f", {args.num_experts} experts per layer" if hasattr(args, "num_experts") else ""
    print(
        f"\n{name}: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_heads} heads, "
        f"{args.num_kv_heads} KV heads x {args.head_dim}{experts}"
    )
    budgets = "".join(f"{f'{gib} GiB':>18}" for gib in BUDGETS_GIB)
    print(f"  {'setting':<8}{'bytes/layer':>16}{'KV bytes/pos/layer':>20}{budgets}")
    for setting in SETTINGS:
        per_layer = layer_bytes(args, setting.dtype_bytes, setting.quantization)
        per_position = kv_bytes_per_token(args, setting.dtype_bytes)
        cells = ""
        for gib in BUDGETS_GIB:
            try:
                plan = plan_span(args, gib * GIB, setting.dtype_bytes, setting.quantization)
                cell = f"{plan.num_layers} L / {_positions(plan.cache_tokens)} pos"
            except ValueError:
                cell = "no layer fits"
            cells += f"{cell:>18}"
        print(f"  {setting.name:<8}{format_bytes(per_layer):>16}{per_position:>20,}{cells}")




def _load(folder: Path, setting: Setting, device: str) -> nn.Module:
    span = load_span(str(folder), 0, SMALL_SHAPE["num_hidden_layers"], dtype=setting.dtype, device=device)
    return quantize_span(span, setting.quantization, device=device)  # a MoE's experts too, never its router


def _relative(computed: float, measured: float) -> str:
    return f"{(computed - measured) / measured:+.1%}"


def print_measured(name: str, folder: Path, config: Any, cuda: bool) -> None:
    args = model_args(config)
    layers = args.num_layers
    print(
        f"\nChecked against the measured small {name}: hidden {args.hidden_size}, {layers} layers, "
        f"{args.num_heads} heads, {args.num_kv_heads} KV heads, loaded with kernels/loading.load_span on CPU"
    )
    print(
        f"  {'setting':<8}{'computed B/layer':>18}{'measured B/layer':>18}{'diff':>8}"
        f"{'computed KV B/pos':>20}{'measured KV B/pos':>20}{'diff':>8}"
    )
    for setting in SETTINGS:
        computed = layer_bytes(args, setting.dtype_bytes, setting.quantization)
        kv_computed = kv_bytes_per_token(args, setting.dtype_bytes, layers)
        cache = KVCache.allocate(0, layers, 1, args.num_kv_heads, args.head_dim, 64, setting.dtype)
        kv_measured = cache.nbytes() // 64
        span = _load(folder, setting, "cpu")
        measured = module_bytes(span.layers) / layers  # the rotary buffer belongs to the span, not a layer
        print(
            f"  {setting.name:<8}{computed:>18,}{measured:>18,.0f}{_relative(computed, measured):>8}"
            f"{kv_computed:>20,}{kv_measured:>20,}{_relative(kv_computed, kv_measured):>8}"
        )
    print("  B/layer: one layer's weights; KV B/pos: one position over all the span's layers, from KVCache.allocate.")
    print("  measured: parameters + buffers + int8 row scales + nf4 absmax (nested absmax included) per layer;")
    print("  nf4 is computed with fp32 absmax per 64 weights, an upper bound when bitsandbytes double-quantizes it.")
    if cuda:
        print_cuda(folder, args)


def print_cuda(folder: Path, args: Any) -> None:
    if not torch.cuda.is_available():
        print("\nCUDA figures skipped: no GPU is present (torch.cuda.is_available() is False).")
        return
    layers = args.num_layers
    print(f"\nCUDA: torch.cuda.memory_allocated() delta for loading the small span on {torch.cuda.get_device_name()}")
    print("  (includes the span's rotary buffer and the allocator's 512-byte rounding of every tensor)")
    print(f"  {'setting':<8}{'computed B/layer':>18}{'allocated B/layer':>19}{'diff':>8}")
    for setting in SETTINGS:
        computed = layer_bytes(args, setting.dtype_bytes, setting.quantization)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        span = _load(folder, setting, "cuda")
        gc.collect()
        torch.cuda.synchronize()
        allocated = (torch.cuda.memory_allocated() - before) / layers
        print(f"  {setting.name:<8}{computed:>18,}{allocated:>19,.0f}{_relative(computed, allocated):>8}")
        del span


def build_small_checkpoint(folder: Path, config: Any, model_class: type) -> Path:
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    return folder


def main() -> int:
    transformers_logging.disable_progress_bar()
    # On CPU bitsandbytes warns that an optional hub kernel for 4-bit matmuls is missing; sizes do not depend on it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    print("Planned from config (kernels/memory.py); budgets keep 25% for the KV cache, no overhead reserved.")
    print("bytes/layer: weights of one decoder layer; KV bytes/pos/layer: keys + values of one position, one layer;")
    print("fp32 caches in fp32, bf16/int8/nf4 cache in bf16. Cells: layers hosted / KV positions the rest holds.")
    print_planned("Llama-3-8B", LLAMA3_8B())
    print_planned("Llama-3-70B", LLAMA3_70B())
    print_planned("Mixtral-8x7B", MIXTRAL_8X7B())
    small = [
        ("Llama", LlamaConfig(**SMALL_SHAPE), LlamaForCausalLM),
        ("Mixtral (4 experts, top 2)", MixtralConfig(**SMALL_SHAPE, num_local_experts=4), MixtralForCausalLM),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, config, model_class) in enumerate(small):
            folder = build_small_checkpoint(Path(tmp) / f"small-{index}", config, model_class)
            print_measured(name, folder, config, cuda=index == 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
