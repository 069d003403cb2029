"""A chain of spans computes what the whole transformers model computes, for each family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from brigade_testkit import FAMILIES, build_checkpoint, build_model

from brigade.kernels.cache import KVCache
from brigade.kernels.loading import load_head, load_span

# fp32 on CPU: our layers and transformers' differ only in summation order.
ATOL = 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_spans_match_full_model_with_padding_and_cache(family: str, tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path / family, family, seed=1)
    reference = build_model(family, seed=1)
    head = load_head(str(folder))
    spans = [load_span(str(folder), start, end) for start, end in [(0, 1), (1, 4), (4, 6)]]
    ids = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    pads = torch.tensor([0, 4, 9])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits

    hidden = head.embed(ids)
    for span in spans:
        hidden = span(hidden, pads)
    logits = head.logits(hidden)
    for row, pad in enumerate(pads.tolist()):
        torch.testing.assert_close(logits[row, pad:], expected[row, pad:], atol=ATOL, rtol=1e-4)

    caches = [s.args.new_cache(s.start, s.end, 3, 12, torch.float32, "cpu") for s in spans]
    pieces = []
    for begin, end in [(0, 10), (10, 11), (11, 12)]:
        hidden = head.embed(ids[:, begin:end])
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, pads, cache)
        pieces.append(head.logits(hidden))
    incremental = torch.cat(pieces, dim=1)
    for row, pad in enumerate(pads.tolist()):
        torch.testing.assert_close(incremental[row, pad:], expected[row, pad:], atol=ATOL, rtol=1e-4)


def test_sub_range_of_a_span_and_cache_rollback(tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path / "llama", "llama", seed=2)
    whole = load_span(str(folder), 0, 6)
    parts = [load_span(str(folder), 0, 3), load_span(str(folder), 3, 6)]
    hidden = torch.randn(1, 5, 64)
    pads = torch.zeros(1, dtype=torch.long)
    via_sub_ranges = whole(whole(hidden, pads, layers=(0, 3)), pads, layers=(3, 6))
    torch.testing.assert_close(via_sub_ranges, parts[1](parts[0](hidden, pads), pads), atol=ATOL, rtol=1e-4)

    cache = KVCache.allocate(0, 6, 1, 2, 16, 8, torch.float32)
    first = whole(hidden, pads, cache)
    whole(torch.randn(1, 2, 64), pads, cache)  # positions a rollback will discard
    cache.truncate(3)
    again = whole(hidden[:, 3:], pads, cache)
    torch.testing.assert_close(again, first[:, 3:], atol=ATOL, rtol=1e-4)


def test_unsupported_family_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config

    from brigade.kernels.families import SUPPORTED_MODEL_TYPES, model_args
    from brigade.kernels.span import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"gpt2.*supported: bloom, falcon, gemma2, .*llama") as error:
        model_args(GPT2Config())
    assert all(model_type in str(error.value) for model_type in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_spans_stay_close_to_fp32(dtype: torch.dtype, tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path / "llama", "llama", seed=5)
    exact = load_span(str(folder), 0, 6)
    reduced = load_span(str(folder), 0, 6, dtype=dtype)
    hidden = torch.randn(2, 7, 64)
    pads = torch.tensor([0, 2])
    expected = exact(hidden, pads)
    got = reduced(hidden.to(dtype), pads).float()
    # 8 (bf16) or 11 (fp16) mantissa bits through 6 layers: a few percent of the activations' scale.
    scale = expected.abs().mean()
    assert (got - expected)[:, 2:].abs().mean() < 0.05 * scale
