"""The KV cache of one session over a span of layers, and the masks and positions it implies.

Sequences of a batch are left-padded to a common length: slot ``j`` of sequence ``b`` holds
position ``j - pad[b]``, and slots below ``pad[b]`` are never attended to. This keeps every
sequence of a session at the same cache length, so a step is one dense tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys and values for layers ``[start, end)``: each ``[B, kv_heads, capacity, head_dim]``.

    The peer's cache manager allocates and grows these; the layers only write into them.
    """

    start: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0  # positions filled so far
    _capacity: int = field(init=False)

    def __post_init__(self) -> None:
        self._capacity = self.keys[0].shape[2] if self.keys else 0

    @classmethod
    def allocate(
        cls,
        start: int,
        end: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = (batch, kv_heads, capacity, head_dim)
        count = end - start
        return cls(
            start=start,
            keys=[torch.empty(shape, dtype=dtype, device=device) for _ in range(count)],
            values=[torch.empty(shape, dtype=dtype, device=device) for _ in range(count)],
        )

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def end(self) -> int:
        return self.start + len(self.keys)

    def layer(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = global_index - self.start
        return self.keys[index], self.values[index]

    def grow(self, capacity: int) -> None:
        """Moves the filled positions into buffers of ``capacity`` positions (never shrinks)."""
        if capacity <= self._capacity:
            return
        for tensors in (self.keys, self.values):
            for index, old in enumerate(tensors):
                new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, : self.length] = old[:, :, : self.length]
                tensors[index] = new
        self._capacity = capacity

    def truncate(self, length: int) -> None:
        """Forgets positions from ``length`` on (rollback for speculation and replays)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def positions_for(pad_lengths: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Rotary positions [B, T] of slots ``[offset, offset + length)``; padding slots get 0."""
    slots = torch.arange(offset, offset + length, device=pad_lengths.device)
    return (slots[None, :] - pad_lengths[:, None]).clamp_min(0)


def attention_mask(
    pad_lengths: torch.Tensor, offset: int, length: int, window: int | None = None
) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, offset + T]: causal, padding keys hidden; None when nothing is hidden.

    ``window``: a query also does not see keys ``window`` or more slots behind it (sliding-window
    attention; slots and positions differ by the same padding, so slot distance is position distance).
    A padding slot may see itself, so its row is never empty (an all-masked row makes NaNs that
    would then be rejected on the wire); its output is never used by real positions.
    """
    total = offset + length
    if length == 1 and not bool(pad_lengths.any()) and (window is None or total <= window):
        return None  # one new position without padding sees every key: the common decode step
    queries = torch.arange(offset, total, device=pad_lengths.device)[:, None]  # [T, 1]
    keys = torch.arange(total, device=pad_lengths.device)[None, :]  # [1, S]
    causal = keys <= queries  # [T, S]
    if window is not None:
        causal &= keys > queries - window
    not_padding = keys[None] >= pad_lengths[:, None, None]  # [B, 1, S]
    return ((causal[None] & not_padding) | (keys == queries)[None])[:, None]  # [B, 1, T, S]
