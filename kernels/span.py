"""What every model family shares: the common args, the span module, RMSNorm and rotary embeddings.

A family module (``llama.py``, ``gemma.py``, ...) defines an args dataclass (a ``ModelArgs``
read from the transformers config), its decoder layer, and a ``Span`` subclass that says how to
build layer ``i``. Everything session-shaped (caches, positions, masks, batching) lives in
``batch.py`` and ``cache.py`` and is the same for every family; ``families.py`` maps transformers
model types to families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from brigade.kernels.batch import Segment, SegmentBatch
from brigade.kernels.cache import KVCache, cache_positions
from brigade.kernels.rope import (
    Rope,
    RopeConfigError,
    Rotary,
    apply_rotary,
    depends_on_length,
    rope_layer_types,
    usable_positions,
)

__all__ = ["HeadSpec", "ModelArgs", "RMSNorm", "Rope", "Rotary", "Span", "UnsupportedModelError", "apply_rotary"]

LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """The checkpoint's family or options are not implemented here."""


@dataclass(frozen=True)
class HeadSpec:
    """What the client computes at both ends of the model, and where its tensors sit in the checkpoint."""

    make_norm: Callable[[], nn.Module]  # the final norm (its parameters load from ``norm``)
    embed: str = "model.embed_tokens.weight"  # checkpoint name of the token embeddings
    norm: str = "model.norm"  # checkpoint prefix of the final norm's parameters
    lm_head: str = "lm_head.weight"
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden), in the compute dtype
    embed_norm: str | None = None  # BLOOM: checkpoint prefix of a LayerNorm applied right after the embeddings
    final_softcap: float | None = None  # Gemma 2: logits become c * tanh(logits / c)


@dataclass(frozen=True)
class ModelArgs:
    """The fields every family has; the peer, the cache and the planner only use these."""

    model_type: str
    num_layers: int
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_windows: tuple[int | None, ...]  # sliding window of each layer; None: full attention
    rope_by_length: bool  # some rotary table depends on the sequence length: steps carry rope_lengths

    @classmethod
    def from_config(cls, config: Any) -> ModelArgs:
        raise NotImplementedError

    @staticmethod
    def common(config: Any) -> dict[str, Any]:
        """The common fields as read from a transformers config (families override what differs)."""
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        check_rope(config, head_dim)
        return dict(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=usable_positions(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            layer_windows=layer_windows(config),
            rope_by_length=depends_on_length(config),
        )

    def head(self) -> HeadSpec:
        raise NotImplementedError

    def recompute_at(self) -> int | None:
        """A cache length at which generation recomputes the whole sequence as one call, or None.

        transformers' Phi-3 drops its cache the first time a sequence grows past
        ``original_max_position_embeddings`` (``prepare_inputs_for_generation``), so every cached key
        is rotated with LongRoPE's long factors from then on; a client that must match it does the same.
        """
        return None

    def cache_positions(self, capacity: int, start: int, end: int) -> int:
        """Pool positions a session of layers ``[start, end)`` takes once it may reach ``capacity`` positions.

        ``capacity`` for full-attention layers, at most the window's ring for sliding-window ones
        (see ``kernels/cache.py``); the peer's cache pool accounts sessions in these.
        """
        return cache_positions(capacity, self.layer_windows[start:end])

    def new_cache(
        self, start: int, end: int, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        """An empty cache for layers ``[start, end)``, windowed layers bounded to their ring."""
        return KVCache.allocate(start, end, batch, self.num_kv_heads, self.head_dim, capacity, dtype, device,
                                windows=self.layer_windows[start:end])


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """The sliding window of each layer, from ``layer_types`` when the config has them.

    Mistral-style configs put one window on every layer; Qwen2/3 and Gemma name each layer's type
    (Qwen's ``use_sliding_window=False`` leaves every layer full even when a window is set).
    """
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if not types:
        return (None if window is None else int(window),) * layers
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(f"layer types {unknown} are not supported; supported: {', '.join(LAYER_TYPES)}")
    if len(types) != layers:
        raise UnsupportedModelError(f"config names {len(types)} layer types for {layers} layers")
    return tuple(int(window) if kind == "sliding_attention" and window is not None else None for kind in types)


def check_rope(config: Any, head_dim: int) -> None:
    """Builds every rotary table the config defines (on the CPU, a few numbers each), so a variant
    that is unknown or lacks a field is refused by name before anything is loaded."""
    for kind in rope_layer_types(config):
        try:
            Rotary(config, head_dim, kind)
        except RopeConfigError as error:
            where = f" (layers of type {kind})" if kind is not None else ""
            raise UnsupportedModelError(f"{error}{where}") from error


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the weight, as the reference implementation does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Span(nn.Module):
    """Decoder layers ``[start, end)`` of one model; a family says how to build layer ``i``.

    ``layers[i]`` is global layer ``start + i``; its state-dict keys are ``layers.{i}.*``. A layer
    is called as ``layer(x, rope, batch, global_index)`` with ``x`` the flat ``[N, H]`` tokens of
    every segment and ``rope`` the (cos, sin) of its rotary kind.
    """

    args_class: ClassVar[type[ModelArgs]]
    layer_class: ClassVar[Callable[[Any, int], nn.Module]]  # (args, global index) -> decoder layer

    def __init__(self, config: Any, start: int, end: int):
        super().__init__()
        self.config = config
        self.args = self.args_class.from_config(config)
        if not 0 <= start < end <= self.args.num_layers:
            raise ValueError(f"span {start}:{end} is not inside the model's {self.args.num_layers} layers")
        self.start, self.end = start, end
        self.layers = nn.ModuleList(self.make_layer(index) for index in range(start, end))
        self.rotaries = self.make_rotaries()

    def make_layer(self, index: int) -> nn.Module:
        return self.layer_class(self.args, index)

    def make_rotaries(self) -> nn.ModuleDict:
        """Rotary embeddings by kind: computed on the CPU (never stored in checkpoints), moved by ``load_span``."""
        return nn.ModuleDict({"default": Rotary(self.config, self.args.head_dim)})

    def rotary_kind(self, index: int) -> str | None:
        """Which of ``rotaries`` global layer ``index`` uses (None: the family has no rotary, ALiBi)."""
        return "default"

    def _rope(self, kind: str, batch: SegmentBatch, dtype: torch.dtype) -> Rope:
        rotary = self.rotaries[kind]
        return rotary(batch.positions, dtype, batch.rope_lengths if rotary.by_length else None)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        pad_lengths: torch.Tensor,
        cache: KVCache | None = None,
        layers: tuple[int, int] | None = None,
        rope_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs ``hidden`` ([B, T, H]) through global layers ``layers`` (default: the whole span).

        With a cache, the new positions start at ``cache.length``, their keys and values are
        written into it, and ``cache.length`` advances by T. ``pad_lengths`` ([B]) is each
        sequence's left padding, which is masked out as keys and shifts its positions.
        ``rope_lengths`` ([T]): see ``Segment``.
        """
        return self.forward_segments([Segment(hidden, pad_lengths, cache, rope_lengths)], layers)[0]

    @torch.inference_mode()
    def forward_segments(self, segments: list[Segment], layers: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """One pass of several sessions' new positions through ``layers``: one output per segment.

        Each segment keeps its own cache, offset and padding (see ``kernels/batch.py``); the
        projections and MLPs run once over all of their tokens together.
        """
        start, end = layers or (self.start, self.end)
        if not self.start <= start < end <= self.end:
            raise ValueError(f"layers {start}:{end} are not inside this span {self.start}:{self.end}")
        for seg in segments:
            cache = seg.cache
            total = (cache.length if cache is not None else 0) + seg.hidden.shape[1]
            if cache is not None and total > cache.capacity:
                raise ValueError(f"cache holds {cache.capacity} positions, step needs {total}")
        batch = SegmentBatch(segments)
        hidden = batch.flatten()  # [N, H]
        kinds = {self.rotary_kind(index) for index in range(start, end)}
        ropes = {kind: None if kind is None else self._rope(kind, batch, hidden.dtype) for kind in kinds}  # [N, R]
        for index in range(start, end):
            hidden = self.layers[index - self.start](hidden, ropes[self.rotary_kind(index)], batch, index)
        batch.advance()
        return batch.unflatten(hidden)
