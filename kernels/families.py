"""The one place that says how a model family differs: which transformers model types it serves,
which span (layer classes) computes it, where its layers' tensors sit in a checkpoint.

The rest follows from the family's args: the cache rules (each layer's sliding window, hence a
session's bounded cache: ``ModelArgs.cache_positions`` / ``ModelArgs.new_cache``) and what the
client holds at each end (``ModelArgs.head()``: embedding scale, final norm, soft-capping, tied
embeddings). Adding a family is a module with an args dataclass and a ``Span`` subclass, one entry
in ``FAMILIES``, and a parity test (see docs/families.md).
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from brigade.kernels import bloom, falcon, gemma, llama, mixtral, phi3
from brigade.kernels.span import ModelArgs, Span, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers' config.model_type values it serves
    span_class: type[Span]
    layer_prefix: str = "model.layers"  # checkpoint names of layer i start with "{layer_prefix}.{i}."
    # Prefix a checkpoint saved from the bare model lacks (BLOOM's published ones: "h.3." for "transformer.h.3.").
    base_prefix: str | None = None

    @cached_property
    def layer_pattern(self) -> re.Pattern[str]:
        prefix = re.escape(self.layer_prefix)
        if self.base_prefix and self.layer_prefix.startswith(self.base_prefix + "."):
            base = re.escape(self.base_prefix + ".")
            prefix = f"(?:{base})?{re.escape(self.layer_prefix[len(self.base_prefix) + 1:])}"
        return re.compile(rf"^{prefix}\.(\d+)\.")

    def full_name(self, name: str) -> str:
        """A checkpoint name with the base prefix, however the checkpoint spells it."""
        if not self.base_prefix or name.startswith(self.base_prefix + ".") or name == "lm_head.weight":
            return name
        return f"{self.base_prefix}.{name}"

    def checkpoint_name(self, name: str, available: Container[str]) -> str:
        """``name`` as this checkpoint spells it: without the base prefix when saved from the bare model."""
        if name in available or not self.base_prefix or not name.startswith(self.base_prefix + "."):
            return name
        bare = name[len(self.base_prefix) + 1 :]
        return bare if bare in available else name

    def layer_of(self, tensor_name: str) -> int | None:
        """The decoder layer a checkpoint tensor belongs to, or None for the client's tensors."""
        match = self.layer_pattern.match(tensor_name)
        return int(match.group(1)) if match else None

    def span_key(self, tensor_name: str, start: int) -> str:
        """``model.layers.5.mlp.up_proj.weight`` -> ``layers.1.mlp.up_proj.weight`` for a span at 4."""
        match = self.layer_pattern.match(tensor_name)
        if match is None:
            raise ValueError(f"{tensor_name!r} is not a layer tensor")
        return f"layers.{int(match.group(1)) - start}.{tensor_name[match.end():]}"


FAMILIES = (
    Family("llama", llama.MODEL_TYPES, llama.LlamaSpan),
    Family("mixtral", mixtral.MODEL_TYPES, mixtral.MixtralSpan),
    Family("gemma", gemma.MODEL_TYPES, gemma.GemmaSpan),
    Family("phi3", phi3.MODEL_TYPES, phi3.Phi3Span),
    Family("falcon", falcon.MODEL_TYPES, falcon.FalconSpan, layer_prefix="transformer.h"),
    Family("bloom", bloom.MODEL_TYPES, bloom.BloomSpan, layer_prefix="transformer.h", base_prefix="transformer"),
)
SUPPORTED_MODEL_TYPES = tuple(sorted(model_type for family in FAMILIES for model_type in family.model_types))
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_for(config: Any) -> Family:
    """The family of a transformers config, or a clear error naming the supported model types."""
    model_type = getattr(config, "model_type", None) or ""
    hint = ""
    if getattr(config, "text_config", None) is not None:
        hint = f" (a multimodal config; its text model is {getattr(config.text_config, 'model_type', '?')!r})"
    return family_for_model_type(model_type, hint)


def family_for_model_type(model_type: str, hint: str = "") -> Family:
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model type {model_type!r}{hint} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return family


def model_args(config: Any) -> ModelArgs:
    """The args of any supported model: all that peers need to plan, admit and cache sessions.

    Raises ``UnsupportedModelError`` for an unknown model type and for options of a known family
    that are not implemented (ALiBi Falcon, LongRoPE), before anything is loaded.
    """
    return family_for(config).span_class.args_class.from_config(config)


def build_span(config: Any, start: int, end: int) -> Span:
    """Layers ``[start, end)`` of the config's model, with uninitialized weights (load them after)."""
    return family_for(config).span_class(config, start, end)
