"""Tensor encoding for the wire: raw bytes plus dtype and shape, validated before allocation.

Decoding never trusts the sender: the dtype must be in an allowed set, the rank and every
dimension bounded, the byte count exact and the total capped, and the values finite. Only then
is memory taken for the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import InvalidTensorError

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in WIRE_DTYPES.items()}

# A hidden-state batch of 64 sequences x 8192 positions x 16384 fp32 features is 32 GiB; no single
# message should be near that. Peers pass their own, smaller caps from PeerConfig.
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TensorLimits:
    """What a receiver accepts; checked before any allocation."""

    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES  # bytes of one tensor
    max_rank: int = 3
    max_dim: int = 1 << 20  # any single dimension
    check_finite: bool = True  # reject NaN/inf: they would poison every cache downstream


def encode(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Serializes a tensor (cast to ``dtype`` if given) as contiguous raw bytes."""
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if tensor.dtype not in DTYPE_NAMES:
        raise InvalidTensorError(f"dtype {tensor.dtype} cannot travel; use one of {sorted(WIRE_DTYPES)}")
    tensor = tensor.detach().cpu().contiguous()
    # bfloat16 has no numpy twin: view the storage as bytes instead of going through numpy.
    data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return pb.Tensor(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), data=data)


def decode(message: pb.Tensor, limits: TensorLimits = TensorLimits()) -> torch.Tensor:
    """Checks a wire tensor against ``limits`` and returns it as a torch tensor (owns its memory)."""
    dtype = WIRE_DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidTensorError(f"unsupported dtype {message.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    shape = tuple(message.shape)
    if len(shape) > limits.max_rank:
        raise InvalidTensorError(f"tensor rank {len(shape)} exceeds the limit {limits.max_rank}")
    if any(dim < 0 or dim > limits.max_dim for dim in shape):
        raise InvalidTensorError(f"tensor shape {list(shape)} has a dimension outside [0, {limits.max_dim}]")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected > limits.max_bytes:
        raise InvalidTensorError(
            f"tensor of shape {list(shape)} ({expected} bytes) exceeds the {limits.max_bytes}-byte limit"
        )
    if len(message.data) != expected:
        raise InvalidTensorError(
            f"tensor of shape {list(shape)} and dtype {message.dtype} needs {expected} bytes, got {len(message.data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(bytearray(message.data), dtype=dtype).view(shape)
    if limits.check_finite and not bool(torch.isfinite(tensor).all()):
        raise InvalidTensorError("tensor holds NaN or infinite values")
    return tensor
