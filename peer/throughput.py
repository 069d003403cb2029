"""A quick self-measurement of decode speed, announced so routing can weigh peers."""

from __future__ import annotations

import time

import torch

from brigade.kernels.cache import KVCache
from brigade.kernels.llama import LlamaSpan


def measure_decode_throughput(span: LlamaSpan, dtype: torch.dtype, device: str, steps: int = 4) -> float:
    """Tokens per second per layer for batch-1 decode steps at a short context."""
    args = span.args
    cache = KVCache.allocate(span.start, span.end, 1, args.num_kv_heads, args.head_dim, 64, dtype, device)
    pads = torch.zeros(1, dtype=torch.long, device=device)
    hidden = torch.randn(1, 16, args.hidden_size, dtype=dtype, device=device) * 0.1
    span(hidden, pads, cache)  # warm-up, and a context to attend to
    began = time.perf_counter()
    for _ in range(steps):
        span(hidden[:, :1], pads, cache)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds_per_layer = (time.perf_counter() - began) / steps / (span.end - span.start)
    return 1.0 / max(seconds_per_layer, 1e-9)
