"""Several sessions in one pass compute what each computes alone (the contract batching relies on)."""

from __future__ import annotations

from pathlib import Path

import torch
from brigade_testkit import build_checkpoint

from brigade.kernels.batch import Segment
from brigade.kernels.cache import KVCache
from brigade.kernels.loading import load_span

ATOL = 1e-4  # fp32, as the parity tests: a batched matmul may sum in another order than a lone one


def _cache(batch: int, capacity: int = 32) -> KVCache:
    return KVCache.allocate(0, 6, batch, 2, 16, capacity, torch.float32)


def test_ragged_sessions_in_one_pass_match_each_alone(tmp_path: Path) -> None:
    span = load_span(str(build_checkpoint(tmp_path / "llama", "llama", seed=3)), 0, 6)
    generator = torch.Generator().manual_seed(0)
    # (batch, prompt length, left padding): different lengths, batch sizes and paddings
    shapes = [(1, 9, [0]), (2, 4, [0, 2]), (1, 1, [0]), (3, 6, [5, 0, 1])]
    prompts = [torch.randn(b, t, 64, generator=generator) for b, t, _ in shapes]
    pads = [torch.tensor(p) for _, _, p in shapes]

    alone_caches = [_cache(b) for b, _, _ in shapes]
    alone = [span(x, p, c) for x, p, c in zip(prompts, pads, alone_caches, strict=True)]
    together_caches = [_cache(b) for b, _, _ in shapes]
    together = span.forward_segments(
        [Segment(x, p, c) for x, p, c in zip(prompts, pads, together_caches, strict=True)]
    )
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-4)

    # then decode steps of one position each, batched, against the same steps alone
    for _ in range(3):
        steps = [torch.randn(b, 1, 64, generator=generator) for b, _, _ in shapes]
        alone = [span(x, p, c) for x, p, c in zip(steps, pads, alone_caches, strict=True)]
        together = span.forward_segments(
            [Segment(x, p, c) for x, p, c in zip(steps, pads, together_caches, strict=True)]
        )
        for a, b in zip(alone, together, strict=True):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-4)
    assert [c.length for c in together_caches] == [c.length for c in alone_caches] == [12, 7, 4, 9]


def test_stateless_and_cached_segments_mix(tmp_path: Path) -> None:
    span = load_span(str(build_checkpoint(tmp_path / "llama", "llama", seed=4)), 0, 6)
    x = torch.randn(2, 5, 64)
    pads = torch.tensor([0, 1])
    expected = span(x, pads)
    cache = _cache(2)
    stateless, cached = span.forward_segments([Segment(x, pads), Segment(x, pads, cache)])
    torch.testing.assert_close(stateless, expected, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(cached, expected, atol=ATOL, rtol=1e-4)
    assert cache.length == 5
