"""Quantizing a loaded span's linear layers with bitsandbytes (nf4 or int8), on CPU or CUDA.

Weights are loaded at full precision first and then replaced module by module, so loading code
stays one path for every format. Norms and biases keep the span's dtype; the client's
embeddings and LM head are never quantized.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from brigade.kernels.span import Span

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCKSIZE = 64


def _quantized_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype, device: str) -> nn.Module:
    import bitsandbytes as bnb  # imported here: peers that do not quantize never load it

    has_bias = linear.bias is not None
    if kind == "nf4":
        module = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
            quant_type="nf4", device="meta",
        )
        module.weight = bnb.nn.Params4bit(
            linear.weight.data.float(), requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE,
        )
    elif kind == "int8":
        module = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, device="meta",
        )
        module.weight = bnb.nn.Int8Params(linear.weight.data.float(), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unknown quantization {kind!r}; expected one of {QUANTIZATIONS}")
    if has_bias:
        module.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return module.to(device)  # moving Params4bit / Int8Params to the device is what quantizes them


def quantize_span(span: Span, kind: str, device: str = "cpu") -> Span:
    """Replaces every linear layer of ``span`` by its ``kind`` version; ``"none"`` returns it as is.

    Every ``nn.Linear`` inside a layer is replaced, however deep (a mixture of experts' experts
    included); a MoE router is not an ``nn.Linear`` and keeps the span's dtype, so quantization
    never changes which experts a token goes to.
    """
    if kind == "none":
        return span
    if kind not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {kind!r}; expected one of {QUANTIZATIONS}")
    compute_dtype = next(span.parameters()).dtype
    for layer in span.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantized_linear(child, kind, compute_dtype, device))
    span.quantization = kind
    logger.info("quantized layers %d:%d to %s", span.start, span.end, kind)
    return span


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes a module stores: parameters, buffers and bitsandbytes' side tensors.

    Side tensors are int8 row scales and nf4 block absmax (with its own absmax and offset when
    double-quantized). The constant nf4 code tables are left out: they are shared, not per layer.
    """
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        total += _tensor_bytes(tensor)
        scales = getattr(tensor, "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += _tensor_bytes(scales)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += _tensor_bytes(state.absmax)
            if getattr(state, "nested", False):
                total += _tensor_bytes(state.state2.absmax) + _tensor_bytes(torch.as_tensor(state.offset))
    return total
