"""Wire tensors round-trip exactly, and bad ones are refused before any allocation."""

from __future__ import annotations

import pytest
import torch

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import InvalidTensorError
from brigade.protocol.tensors import TensorLimits, decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    tensor = torch.randn(2, 3, 5).to(dtype)
    assert torch.equal(decode(encode(tensor)), tensor)


def test_encode_casts_to_the_wire_dtype() -> None:
    tensor = torch.randn(1, 2, 4)
    assert decode(encode(tensor, torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (pb.Tensor(dtype="int64", shape=[1], data=b"\0" * 8), "unsupported dtype"),
        (pb.Tensor(dtype="float32", shape=[1, 1, 1, 1], data=b"\0" * 4), "rank"),
        (pb.Tensor(dtype="float32", shape=[1, -1, 4], data=b""), "dimension"),
        (pb.Tensor(dtype="float32", shape=[1, 2, 4], data=b"\0" * 31), "needs 32 bytes, got 31"),
        (pb.Tensor(dtype="float32", shape=[1, 1 << 20, 1 << 10], data=b""), "exceeds"),
        (pb.Tensor(dtype="float32", shape=[1, 1, 1], data=torch.tensor([float("nan")]).numpy().tobytes()), "NaN"),
    ],
)
def test_bad_tensors_are_refused(message: pb.Tensor, error: str) -> None:
    with pytest.raises(InvalidTensorError, match=error):
        decode(message, TensorLimits(max_bytes=1 << 20))
