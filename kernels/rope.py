"""Rotary position embeddings: every rope variant transformers defines for the supported families.

Static variants (``default``, ``linear``, ``yarn``, ``llama3``) have one table of inverse
frequencies. Two variants change their table with the length of the sequence, exactly as
transformers' ``dynamic_rope_update`` does:

- ``dynamic`` (NTK): a forward over a sequence longer than ``max_position_embeddings`` uses a
  table recomputed for that length; shorter ones use the original table.
- ``longrope`` (Phi-3/3.5): the long factors once the sequence is longer than
  ``original_max_position_embeddings``, the short factors otherwise.

"The length of the sequence" is transformers' ``max(position_ids) + 1`` of one forward call, so it
is a property of the call, not of a position: a prompt of 5,000 tokens rotates all of its keys with
the long factors, while keys cached before the sequence crossed the switch keep their short-factor
rotation. A span therefore takes, per position, the length of the call that position belongs to
(``rope_lengths``); the client sends it with every step of such a model and replays it unchanged,
so a rebuilt cache holds the same keys as the one it replaces.

Every table is computed on the CPU, outside any meta-device context (a span is built on the meta
device, where transformers' helpers would make tensors without data), and from transformers' own
helpers with the same argument types, so the frequencies are bit-identical to the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
LENGTH_ROPE_TYPES = ("dynamic", "longrope")  # their table depends on the length of the sequence
ROPE_TYPES = STATIC_ROPE_TYPES + LENGTH_ROPE_TYPES

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [N, rotary_dim] each


class RopeConfigError(ValueError):
    """The config's rope settings name an unknown variant or lack a field the variant needs."""


def rope_parameters_of(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope settings of the config (of one layer type, for per-layer-type configs such as Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(rope.get(layer_type), dict):
        return rope[layer_type]
    return rope


def rope_layer_types(config: Any) -> list[str | None]:
    """The rope kinds a config defines: its layer types when each has its own settings, else one (None)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(value, dict) for value in rope.values()):
        return sorted(rope)
    return [None]


def rope_type_of(config: Any, layer_type: str | None = None) -> str:
    return rope_parameters_of(config, layer_type).get("rope_type", "default")


def depends_on_length(config: Any) -> bool:
    """True when some layer's rotary table changes with the sequence length (dynamic, longrope)."""
    return any(rope_type_of(config, kind) in LENGTH_ROPE_TYPES for kind in rope_layer_types(config))


def usable_positions(config: Any) -> int:
    """How long a sequence may grow: ``max_position_embeddings``, times the factor for dynamic NTK, whose
    whole point is to stretch past it (the other scaled variants already name their extended length)."""
    positions = int(config.max_position_embeddings)
    for kind in rope_layer_types(config):
        rope = rope_parameters_of(config, kind)
        if rope.get("rope_type") == "dynamic":
            positions = max(positions, int(positions * float(rope.get("factor", 1.0))))
    return positions


class Rotary(nn.Module):
    """Rotary embedding over the first ``rotary_dim`` features of each head (all of them unless partial).

    ``layer_type`` picks one of a config's per-layer-type settings (Gemma 3: local and global layers).
    Raises ``RopeConfigError`` naming the variant and the missing field when the settings are incomplete.
    """

    def __init__(self, config: Any, head_dim: int, layer_type: str | None = None):
        super().__init__()
        rope = rope_parameters_of(config, layer_type)
        self.rope_type = rope.get("rope_type", "default")
        if self.rope_type not in ROPE_TYPES:
            raise RopeConfigError(f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        self.config, self.layer_type = config, layer_type
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        with torch.device("cpu"):  # even inside the meta-device context a span is built in
            try:
                inv_freq, scaling = self._table(rope, head_dim, None)
                long_freq = None
                if self.rope_type == "longrope":
                    self.switch_length = int(rope["original_max_position_embeddings"])
                    long_freq, _ = self._table(rope, head_dim, self.switch_length + 1)
            except KeyError as error:
                raise RopeConfigError(
                    f"rope type {self.rope_type!r} needs the field {error.args[0]!r} in rope_parameters "
                    "(rope_scaling in config.json); add it as the checkpoint's publisher documents it"
                ) from error
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # [R/2]
        if long_freq is not None:
            self.register_buffer("long_inv_freq", long_freq.float(), persistent=False)
        self.scaling = float(scaling)

    def _table(self, rope: dict[str, Any], head_dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            theta = rope.get("rope_theta", getattr(self.config, "rope_theta", 10000.0))
            dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
            return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kwargs: dict[str, Any] = {"layer_type": self.layer_type} if self.layer_type is not None else {}
        if seq_len is not None:
            kwargs["seq_len"] = seq_len
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, torch.device("cpu"), **kwargs)

    @property
    def by_length(self) -> bool:
        return self.rope_type in LENGTH_ROPE_TYPES

    def _dynamic_tables(self, lengths: torch.Tensor) -> torch.Tensor:
        """transformers' dynamic NTK tables [U, R/2] for forward calls of ``lengths`` [U] positions.

        The same float32 operations as ``_compute_dynamic_ntk_parameters`` on a tensor length, done
        for every length at once: bit-identical tables, and one vectorised op however many distinct
        lengths a pass brings (a per-length call would let one client's lengths stall the pass).
        """
        rope = rope_parameters_of(self.config, self.layer_type)
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        factor = rope["factor"]
        lengths = torch.maximum(lengths.cpu(), torch.tensor(self.max_positions, dtype=lengths.dtype))
        ratio = (factor * lengths / self.max_positions) - (factor - 1)  # [U] float32
        # On a 0-dim tensor (transformers' case) torch computes this power in double: so do we, per element.
        base = rope["rope_theta"] * (ratio.double() ** (dim / (dim - 2))).float()
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
        tables = 1.0 / torch.pow(base[:, None], exponents[None, :])  # [U, R/2]
        original = lengths <= self.max_positions  # up to max_position_embeddings: the original table
        return torch.where(original[:, None], self.inv_freq.cpu(), tables).to(self.inv_freq.device)

    def _tables(self, rope_lengths: torch.Tensor) -> torch.Tensor:
        """Inverse frequencies per position [N, R/2] from each position's call length [N]."""
        if self.rope_type == "longrope":
            long = (rope_lengths > self.switch_length)[:, None].to(self.inv_freq.device)
            return torch.where(long, self.long_inv_freq, self.inv_freq)
        lengths, where = torch.unique(rope_lengths, return_inverse=True)
        return self._dynamic_tables(lengths)[where.to(self.inv_freq.device)]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, rope_lengths: torch.Tensor | None = None) -> Rope:
        """cos and sin [N, R] for ``positions`` [N]; ``rope_lengths`` [N] matters only to length-dependent variants."""
        if self.by_length and rope_lengths is not None:
            freqs = positions[:, None].float() * self._tables(rope_lengths)  # [N, R/2]
        else:
            freqs = positions[..., None].float() * self.inv_freq  # [N, R/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [N, R]
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotates the first ``R`` features of each head; the rest pass through (partial rotary)."""
    cos, sin = rope  # [N, R]
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:  # x: [N, heads, D]
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos[:, None] + _rotate_half(rotated) * sin[:, None], passed), dim=-1)
