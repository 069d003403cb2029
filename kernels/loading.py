"""Building a span or a client head from a checkpoint, reading only the tensors it needs.

Modules are made on the meta device (no memory), then the checkpoint's tensors are assigned in
place, so peak memory is the slice itself and never the whole model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from brigade.kernels.checkpoint import Checkpoint, CheckpointMismatchError, resolve, resolve_config_folder
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
    except KeyError as e:  # transformers' own validation of the config (a rope variant lacking a field, say)
        raise UnsupportedModelError(f"config.json of {model} is incomplete: {e.args[0] if e.args else e}") from e
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


def _compare(module: torch.nn.Module, shapes: dict[str, tuple[int, ...] | None], model: str) -> None:
    """Raises ``CheckpointMismatchError`` naming the first tensor the module and the checkpoint disagree on.

    ``shapes`` maps each tensor the checkpoint names to its shape, or None where it is not at hand
    (a shard this peer did not fetch): its name is still checked, its shape when it is loaded.
    """
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    hint = "the weights and config.json disagree: re-download the checkpoint, or fix its config.json"
    if missing:
        raise CheckpointMismatchError(f"{model}: the checkpoint lacks {len(missing)} tensors that its config implies "
                                      f"(first: {missing[0]!r}); {hint}")
    if unexpected:
        raise CheckpointMismatchError(f"{model}: the checkpoint has {len(unexpected)} tensors its config does not "
                                      f"account for (first: {unexpected[0]!r}), an option brigade does not model; "
                                      f"{hint}")
    for key, shape in expected.items():
        if shapes[key] is not None and shapes[key] != shape:
            raise CheckpointMismatchError(f"{model}: tensor {key!r} has shape {list(shapes[key] or ())} but the "
                                          f"config implies {list(shape)}; {hint}")


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
            model: str) -> None:
    _compare(module, {key: tuple(value.shape) for key, value in state.items()}, model)
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)


def check_checkpoint(model: str, config: Any) -> None:
    """Checks every tensor a peer or client could load against the config, from the files' headers only.

    For a local folder, before anything starts: a peer refuses a checkpoint that would fail to load
    (or load wrongly) with one line naming the tensor. Names come from the index, shapes from the
    shards that are here (a peer may keep only its own). A Hub repository is checked as its shards
    arrive, by the loaders themselves.
    """
    if not Path(model).is_dir():
        return
    family = family_for(config)
    checkpoint = Checkpoint.open(model)
    present = checkpoint.shapes()
    shapes: dict[str, tuple[int, ...] | None] = {name: present.get(name) for name in checkpoint.weight_map}
    num_layers = model_args(config).num_layers
    with torch.device("meta"):
        span = family.span_class(config, 0, num_layers)
        head = ClientHead(config)
    layer_shapes = {family.span_key(name, 0): shape for name, shape in shapes.items()
                    if family.layer_of(name) is not None and not name.endswith(STALE_SUFFIXES)}
    _compare(span, layer_shapes, model)
    names = {family.checkpoint_name(name, shapes): key for name, key in head.checkpoint_names().items()}
    if head.args.tie_word_embeddings or head.spec.lm_head not in shapes:
        names.pop(head.spec.lm_head, None)
        head.lm_head = torch.nn.Identity()  # tied: the embeddings are the LM head
    missing = sorted(name for name in names if name not in shapes)
    if missing:
        raise CheckpointMismatchError(f"{model}: the checkpoint lacks {missing[0]!r}, which the client needs; "
                                      "re-download the checkpoint, or fix its config.json")
    _compare(head, {key: shapes[name] for name, key in names.items()}, model)


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
    _assign(span, state, dtype, device, model)
    span.to(device)  # computed buffers (rotary tables, ALiBi slopes) are made on the CPU, never checkpointed
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
    family = family_for(config)
    names = head.checkpoint_names()
    checkpoint = resolve(model, lambda name: family.full_name(name) in names, revision)
    wanted = {family.checkpoint_name(name, checkpoint.weight_map): key for name, key in names.items()}
    # Tied (or stored without an LM head): the embeddings serve as the LM head, one tensor for both.
    tied = head.args.tie_word_embeddings or head.spec.lm_head not in checkpoint.weight_map
    if tied:
        wanted.pop(head.spec.lm_head)
    state = {wanted[name]: tensor for name, tensor in checkpoint.read(wanted).items()}
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _assign(head, state, dtype, device, model)
    if tied:
        head.lm_head.weight = head.embed_tokens.weight
    return head.eval()
