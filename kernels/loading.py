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
from brigade.kernels.families import SUPPORTED_MODEL_TYPES, family_for, model_args
from brigade.kernels.head import ClientHead
from brigade.kernels.span import ModelArgs, Span, UnsupportedModelError

logger = logging.getLogger(__name__)

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
STALE_SUFFIXES = ("rotary_emb.inv_freq",)  # computed buffers that old checkpoints saved; never loaded


def load_config(model: str, revision: str | None = None) -> Any:
    folder = resolve_config_folder(model, revision)
    try:
        return AutoConfig.from_pretrained(folder)
    except ValueError as e:
        if "model type" not in str(e):
            raise
        # transformers itself does not know the model type: still say what brigade serves.
        raise UnsupportedModelError(f"{e}; brigade supports: {', '.join(SUPPORTED_MODEL_TYPES)}") from e


def check_supported(model: str, revision: str | None = None) -> ModelArgs:
    """The model's args, or ``UnsupportedModelError`` naming its type and the supported ones.

    Reads only the config, so a peer can refuse a model before it starts anything.
    """
    return model_args(load_config(model, revision))


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
) -> Span:
    """The span of layers [start, end) of ``model`` (a local folder or a Hub repo id).

    Only the span's own tensors are fetched and read; for a mixture-of-experts model that means
    only the experts of the span's layers.
    """
    config = config or load_config(model, revision)
    family = family_for(config)
    with torch.device("meta"):
        span = family.span_class(config, start, end)

    def keep(name: str) -> bool:
        layer = family.layer_of(name)
        return layer is not None and start <= layer < end and not name.endswith(STALE_SUFFIXES)

    checkpoint: Checkpoint = resolve(model, keep, revision)
    names = checkpoint.names(keep)
    state = {family.span_key(name, start): tensor for name, tensor in checkpoint.read(names).items()}
    _assign(span, state, dtype, device)
    span.rotaries.to(device)  # computed on the CPU at construction, never read from the checkpoint
    logger.info("loaded layers %d:%d of %s (%s, %d tensors, %s)", start, end, model, family.name, len(names), dtype)
    return span.eval()


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
    wanted = head.checkpoint_names()
    checkpoint = resolve(model, wanted.__contains__, revision)
    # Tied (or stored without an LM head): the embeddings serve as the LM head, one tensor for both.
    tied = head.args.tie_word_embeddings or head.spec.lm_head not in checkpoint.weight_map
    if tied:
        wanted.pop(head.spec.lm_head)
    state = {wanted[name]: tensor for name, tensor in checkpoint.read(wanted).items()}
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _assign(head, state, dtype, device)
    if tied:
        head.lm_head.weight = head.embed_tokens.weight
    return head.eval()
