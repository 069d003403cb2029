"""Spans on a CUDA device: bf16 and nf4 compute what the CPU computes, within their precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from brigade_testkit import build_checkpoint

from brigade.kernels.loading import load_span
from brigade.kernels.quant import quantize_span

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize(("dtype", "kind", "bound"), [(torch.bfloat16, "none", 0.05), (torch.bfloat16, "nf4", 0.15)])
def test_cuda_span_is_close_to_cpu_fp32(tmp_path: Path, dtype: torch.dtype, kind: str, bound: float) -> None:
    folder = build_checkpoint(tmp_path / "llama", "llama", seed=3, initializer_range=0.02)
    expected = load_span(str(folder), 0, 6)(torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)),
                                            torch.tensor([0, 3]))
    span = quantize_span(load_span(str(folder), 0, 6, dtype=dtype, device="cuda"), kind, device="cuda")
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    got = span(hidden, torch.tensor([0, 3], device="cuda")).float().cpu()
    relative = (got - expected)[:, 3:].abs().mean() / expected[:, 3:].abs().mean()
    assert relative < bound, f"{kind} at {dtype} on CUDA is {relative:.1%} off the CPU fp32 result"
