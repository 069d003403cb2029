"""Building a span or a client head from a checkpoint, reading only the tensors it needs.

Modules are made on the meta device (no memory), then the checkpoint's tensors are assigned in
place, so peak memory is the slice itself and never the whole model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoConfig

from brigade.kernels.checkpoint import Checkpoint, resolve, resolve_config_folder
from brigade.kernels.head import ClientHead
from brigade.kernels.llama import LlamaSpan

logger = logging.getLogger(__name__)

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def load_config(model: str, revision: str | None = None) -> Any:
    return AutoConfig.from_pretrained(resolve_config_folder(model, revision))


def _span_keep(start: int, end: int):
    from brigade.kernels.checkpoint import layer_of

    def keep(name: str) -> bool:
        layer = layer_of(name)
        return layer is not None and start <= layer < end

    return keep


def _span_key(checkpoint_name: str, start: int) -> str:
    """``model.layers.5.mlp.up_proj.weight`` -> ``layers.1.mlp.up_proj.weight`` for a span at 4."""
    parts = checkpoint_name.split(".")
    offset = 1 if parts[0] == "model" else 0
    parts[offset + 1] = str(int(parts[offset + 1]) - start)
    return ".".join(parts[offset:])


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the module: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)


def load_span(
    model: str,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    revision: str | None = None,
    config: Any | None = None,
) -> LlamaSpan:
    """The span of layers [start, end) of ``model`` (a local folder or a Hub repo id)."""
    config = config or load_config(model, revision)
    with torch.device("meta"):
        span = LlamaSpan(config, start, end)
    keep = _span_keep(start, end)
    checkpoint: Checkpoint = resolve(model, keep, revision)
    names = checkpoint.names(keep)
    state = {_span_key(name, start): tensor for name, tensor in checkpoint.read(names).items()}
    _assign(span, state, dtype, device)
    # The rotary frequencies are computed, not stored: rebuild them off the meta device.
    span.rotary = type(span.rotary)(config, span.args.head_dim).to(device)
    logger.info("loaded layers %d:%d of %s (%d tensors, %s)", start, end, model, len(names), dtype)
    return span.eval()


HEAD_TENSORS = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}


def load_head(
    model: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    revision: str | None = None,
    config: Any | None = None,
) -> ClientHead:
    """Embeddings, final norm and LM head of ``model``; the LM head reuses the embeddings when tied."""
    config = config or load_config(model, revision)
    with torch.device("meta"):
        head = ClientHead(config)
    wanted = {**HEAD_TENSORS}
    if not head.args.tie_word_embeddings:
        wanted["lm_head.weight"] = "lm_head.weight"
    checkpoint = resolve(model, wanted.__contains__, revision)
    if "lm_head.weight" not in wanted and "lm_head.weight" in checkpoint.weight_map:
        wanted["lm_head.weight"] = "lm_head.weight"  # some tied checkpoints still store a copy
    state = {wanted[name]: tensor for name, tensor in checkpoint.read(wanted).items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _assign(head, state, dtype, device)
    if head.args.tie_word_embeddings:
        head.lm_head.weight = head.embed_tokens.weight  # one tensor, not two copies
    return head.eval()
