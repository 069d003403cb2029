"""Memory planning: the computed sizes match what the real loader, cache and quantizer allocate."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
from brigade_testkit import FAMILIES, build_checkpoint
from torch import nn
from transformers import LlamaConfig, Qwen2Config

from brigade.kernels.cache import KVCache
from brigade.kernels.families import model_args
from brigade.kernels.llama import LlamaArgs, LlamaSpan
from brigade.kernels.loading import load_span
from brigade.kernels.memory import (
    GIB,
    LLAMA3_8B,
    LLAMA3_70B,
    MIXTRAL_8X7B,
    QUANTIZATIONS,
    SpanPlan,
    kv_bytes_per_token,
    layer_bytes,
    layer_parameter_counts,
    parse_bytes,
    plan_span,
)
from brigade.kernels.quant import module_bytes

TINY_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 64, 4 layers, 4 heads, 2 KV heads, vocab 512: the shared tiny Llama with 4 layers."""
    return build_checkpoint(tmp_path_factory.mktemp("memory") / "tiny-llama", "llama", num_hidden_layers=TINY_LAYERS)





@pytest.mark.parametrize(("dtype", "dtype_bytes"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_layer_bytes_equals_a_loaded_span(tiny_checkpoint: Path, dtype: torch.dtype, dtype_bytes: int) -> None:
    span = load_span(str(tiny_checkpoint), 0, TINY_LAYERS, dtype=dtype)
    loaded = sum(p.numel() * p.element_size() for p in span.parameters())
    assert loaded % TINY_LAYERS == 0
    assert layer_bytes(span.args, dtype_bytes, "none") == loaded // TINY_LAYERS


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
        ),
        Qwen2Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
        ),
    ],
    ids=["llama-all-biases", "qwen2-qkv-biases", "llama-wide-heads"],
)
def test_parameter_counts_follow_biases_and_head_dim(config: object) -> None:
    with torch.device("meta"):  # shapes only, nothing allocated
        span = LlamaSpan(config, 0, 1)
    layer = span.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    counts = layer_parameter_counts(span.args)
    assert counts == {"linear": linear, "other": sum(p.numel() for p in layer.parameters()) - linear}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"llama"}))
def test_layer_bytes_of_every_family_equal_its_loaded_span(family: str, tmp_path: Path) -> None:
    span = load_span(str(build_checkpoint(tmp_path / family, family)), 0, 6)
    loaded = sum(p.numel() * p.element_size() for p in span.parameters())
    assert layer_bytes(span.args, 4, "none") * 6 == loaded


def test_mixtral_8x7b_has_its_published_parameter_count() -> None:
    args = model_args(MIXTRAL_8X7B())
    per_layer = layer_parameter_counts(args)
    assert per_layer["other"] == 8 * 4096 + 2 * 4096  # the router and two norms stay at the compute dtype
    head = 2 * args.vocab_size * args.hidden_size + args.hidden_size
    assert args.num_layers * sum(per_layer.values()) + head == 46_702_792_704


def test_llama3_shapes_have_their_published_parameter_counts() -> None:
    """The per-layer count plus embeddings, final norm and LM head gives the well-known totals."""
    for make_config, published in ((LLAMA3_8B, 8_030_261_248), (LLAMA3_70B, 70_553_706_496)):
        args = LlamaArgs.from_config(make_config())
        per_layer = sum(layer_parameter_counts(args).values())
        head = 2 * args.vocab_size * args.hidden_size + args.hidden_size
        assert args.num_layers * per_layer + head == published


@pytest.mark.parametrize(("dtype", "dtype_bytes"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_bytes_per_token_equals_an_allocated_cache(dtype: torch.dtype, dtype_bytes: int) -> None:
    args = LlamaArgs.from_config(LLAMA3_8B())
    batch, capacity, start, end = 3, 5, 2, 6
    cache = KVCache.allocate(start, end, batch, args.num_kv_heads, args.head_dim, capacity, dtype)
    assert kv_bytes_per_token(args, dtype_bytes, end - start) == cache.nbytes() // (batch * capacity)
    assert kv_bytes_per_token(args, dtype_bytes) * (end - start) == kv_bytes_per_token(args, dtype_bytes, end - start)


def test_quantized_layer_bytes_are_within_ten_percent_of_a_quantized_span(tiny_checkpoint: Path) -> None:
    if importlib.util.find_spec("brigade.kernels.quant") is None:
        pytest.skip("kernels/quant.py does not exist yet, so there is no quantized span to measure")
    quant = importlib.import_module("brigade.kernels.quant")
    if not hasattr(quant, "quantize_span"):
        pytest.skip("kernels/quant.py has no quantize_span yet, so there is no quantized span to measure")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed; int8/nf4 cannot be measured")
    for kind in ("int8", "nf4"):
        span = quant.quantize_span(load_span(str(tiny_checkpoint), 0, TINY_LAYERS, dtype=torch.bfloat16), kind)
        measured = module_bytes(span.layers) / TINY_LAYERS  # the rotary buffer is per span, not per layer
        computed = layer_bytes(span.args, 2, kind)
        assert abs(computed - measured) <= 0.10 * measured, f"{kind}: computed {computed}, measured {measured}"
        # The plan must not undercount: quantization really shrinks the layer, and by about what it says.
        assert computed < layer_bytes(span.args, 2, "none")


def test_plan_respects_budget_and_cache_share() -> None:
    args = LlamaArgs.from_config(LLAMA3_70B())
    for quantization in QUANTIZATIONS:
        for budget in (8 * GIB, 24 * GIB, 80 * GIB):
            for share in (0.1, 0.25, 0.5):
                overhead = GIB // 2
                plan = plan_span(args, budget, 2, quantization, cache_share=share, overhead_bytes=overhead)
                usable = budget - overhead
                assert plan.weight_bytes == plan.num_layers * layer_bytes(args, 2, quantization)
                assert plan.cache_bytes == plan.cache_tokens * kv_bytes_per_token(args, 2, plan.num_layers)
                assert plan.weight_bytes + plan.cache_bytes + overhead <= budget
                assert plan.weight_bytes <= usable * (1 - share)
                assert plan.cache_bytes >= usable * share - kv_bytes_per_token(args, 2, plan.num_layers)
                assert plan.budget_bytes == budget


def test_plan_is_monotonic_in_budget() -> None:
    args = LlamaArgs.from_config(LLAMA3_8B())
    previous: SpanPlan | None = None
    for budget in range(GIB, 40 * GIB, GIB // 4):
        plan = plan_span(args, budget, 2, "nf4")
        if previous is not None:
            assert plan.num_layers >= previous.num_layers
            if plan.num_layers == previous.num_layers:
                assert plan.cache_tokens >= previous.cache_tokens
        previous = plan
    assert previous is not None and previous.num_layers == args.num_layers


def test_plan_caps_layers_and_gives_the_rest_to_the_cache() -> None:
    args = LlamaArgs.from_config(LLAMA3_8B())
    free = plan_span(args, 24 * GIB, 2, "none")
    capped = plan_span(args, 24 * GIB, 2, "none", max_layers=4)
    assert free.num_layers > 4 and capped.num_layers == 4
    assert capped.weight_bytes + capped.cache_bytes > 24 * GIB - kv_bytes_per_token(args, 2, 4)
    assert plan_span(args, 80 * GIB, 2, "none").num_layers == args.num_layers  # never more than the model has


def test_plan_refuses_a_budget_without_room_for_one_layer() -> None:
    args = LlamaArgs.from_config(LLAMA3_70B())
    one_layer = layer_bytes(args, 2, "none")
    assert plan_span(args, int(one_layer / 0.75) + 1, 2, "none").num_layers == 1
    with pytest.raises(ValueError, match="not even one layer fits"):
        plan_span(args, int(one_layer / 0.75) - 1, 2, "none")
    with pytest.raises(ValueError, match="not even one layer fits"):
        plan_span(args, 8 * GIB, 2, "none", overhead_bytes=9 * GIB)
    with pytest.raises(ValueError, match="unknown quantization"):
        plan_span(args, 8 * GIB, 2, "int4")
    with pytest.raises(ValueError, match="cache_share"):
        plan_span(args, 8 * GIB, 2, "none", cache_share=1.0)


def test_describe_is_one_readable_line() -> None:
    plan = SpanPlan(
        num_layers=12, weight_bytes=int(3.1 * GIB), cache_tokens=40_960, cache_bytes=GIB, budget_bytes=6 * GIB
    )
    expected = "12 layers (3.1 GiB of weights) + KV cache for 40,960 positions (1.0 GiB) in a 6.0 GiB budget"
    assert plan.describe() == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("8GB", 8 * 10**9),
        ("1.5 GiB", 3 * 2**29),
        ("1000000", 1_000_000),
        (" 64 kib ", 64 * 1024),
        ("2TB", 2 * 10**12),
        ("100B", 100),
        ("1.1 GiB", int(1.1 * 2**30)),
    ],
)
def test_parse_bytes_reads_sizes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "6 G", "-1GiB", "6 GiBs", "1e9", "six GiB", "1.2.3 MB"])
def test_parse_bytes_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes(text)
