"""The KV cache of one session over a span of layers, and the masks and positions it implies.

Sequences of a batch are left-padded to a common length: slot ``j`` of sequence ``b`` holds
position ``j - pad[b]``, and slots below ``pad[b]`` are never attended to. This keeps every
sequence of a session at the same cache length, so a step is one dense tensor.

Sliding-window layers keep a bounded ring instead of every slot: a layer whose window is ``w``
holds at most ``ring_size(w) = w - 1 + min(w, ROLLBACK_SLACK)`` slots, slot ``s`` at index
``s % size``. The ``w - 1`` newest slots are what a new position needs; the slack lets a step of
several positions write in place and lets a rollback of up to that many positions keep every slot
the next step will look at (see ``KVCache.truncate``). Full-attention layers of the same cache
keep every slot, so a span mixing both (Gemma) pays the full price only for its global layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

ROLLBACK_SLACK = 64  # extra slots a windowed layer keeps beyond its window (rollback depth, in-place step size)


def ring_size(window: int) -> int:
    """Slots a layer with sliding window ``window`` keeps at most."""
    return window - 1 + min(window, ROLLBACK_SLACK)


def cache_positions(capacity: int, windows: Sequence[int | None]) -> int:
    """What a cache that may reach ``capacity`` positions costs, in positions of all its layers.

    A full-attention span costs ``capacity``; a windowed layer costs at most its ring. The pool
    accounts positions over all of a span's layers at once, so the layers' costs are averaged
    (rounded up): an all-windowed span never costs more than its ring, however long the session.
    """
    if not windows:
        return capacity
    per_layer = [capacity if window is None else min(capacity, ring_size(window)) for window in windows]
    return math.ceil(sum(per_layer) / len(per_layer))


@dataclass
class KVCache:
    """Keys and values for layers ``[start, end)``: each ``[B, kv_heads, size, head_dim]``.

    ``capacity`` is how many positions the session may reach without growing; a layer's buffer
    holds ``min(capacity, ring_size(window))`` slots. The peer's cache manager allocates and grows
    these; the layers write into them only through ``update``.
    """

    start: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0  # positions filled so far
    windows: tuple[int | None, ...] = ()  # sliding window of each layer (None: full attention); () = all full
    _capacity: int = field(init=False)

    def __post_init__(self) -> None:
        self._capacity = self.keys[0].shape[2] if self.keys else 0
        if not self.windows:
            self.windows = (None,) * len(self.keys)
        if len(self.windows) != len(self.keys):
            raise ValueError(f"{len(self.windows)} windows for a cache of {len(self.keys)} layers")

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
        windows: Sequence[int | None] = (),
    ) -> KVCache:
        count = end - start
        windows = tuple(windows) or (None,) * count
        if len(windows) != count:
            raise ValueError(f"{len(windows)} windows for layers {start}:{end}")
        sizes = [_layer_size(capacity, window) for window in windows]
        cache = cls(
            start=start,
            keys=[torch.empty((batch, kv_heads, size, head_dim), dtype=dtype, device=device) for size in sizes],
            values=[torch.empty((batch, kv_heads, size, head_dim), dtype=dtype, device=device) for size in sizes],
            windows=windows,
        )
        cache._capacity = capacity
        return cache

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def end(self) -> int:
        return self.start + len(self.keys)

    def layer(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw buffers of a layer (a ring when its window is shorter than the session)."""
        index = global_index - self.start
        return self.keys[index], self.values[index]

    def update(
        self, global_index: int, offset: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Writes new keys and values (``[B, kv, T, D]``) at slots ``[offset, offset + T)``.

        Returns what the new positions attend over: keys, values, and the slot each key column
        holds, or None when the keys are simply slots ``[0, offset + T)`` in order. A windowed
        layer past its ring returns the ring in place (every column written by then), or, for a
        step longer than its slack, the ring's written columns followed by the new positions.
        """
        index = global_index - self.start
        keys, values = self.keys[index], self.values[index]
        size, length = keys.shape[2], k.shape[2]
        end = offset + length
        if end <= size:
            keys[:, :, offset:end] = k
            values[:, :, offset:end] = v
            return keys[:, :, :end], values[:, :, :end], None
        window = self.windows[index]
        if window is None:
            raise ValueError(f"layer {global_index} holds {size} positions, step needs {end}")
        if length <= size - window + 1:  # every slot these queries see survives the write
            ring = torch.arange(offset, end, device=keys.device) % size
            keys[:, :, ring] = k
            values[:, :, ring] = v
            return keys, values, ring_slots(size, end, keys.device)
        # Only columns already written take part: unwritten ones hold garbage (maybe NaN, and 0 * NaN is NaN).
        filled = min(offset, size)
        held = ring_slots(size, offset, keys.device)[:filled]
        all_keys = torch.cat((keys[:, :, :filled], k), dim=2)
        all_values = torch.cat((values[:, :, :filled], v), dim=2)
        keep = min(length, size)  # the newest slots go into the ring, the rest of it stays as it was
        ring = torch.arange(end - keep, end, device=keys.device) % size
        keys[:, :, ring] = k[:, :, -keep:]
        values[:, :, ring] = v[:, :, -keep:]
        return all_keys, all_values, torch.cat((held, torch.arange(offset, end, device=keys.device)))

    def grow(self, capacity: int) -> None:
        """Lets the session reach ``capacity`` positions: full layers move to bigger buffers (never shrinks)."""
        if capacity <= self._capacity:
            return
        for index, window in enumerate(self.windows):
            size = _layer_size(capacity, window)
            old_size = self.keys[index].shape[2]
            if size <= old_size:
                continue
            if self.length > old_size:
                raise RuntimeError(f"layer {self.start + index} wrapped at {old_size} slots before its ring was full")
            for tensors in (self.keys, self.values):
                old = tensors[index]
                new = old.new_empty((*old.shape[:2], size, old.shape[3]))
                new[:, :, : self.length] = old[:, :, : self.length]
                tensors[index] = new
        self._capacity = capacity

    def truncate(self, length: int) -> None:
        """Forgets positions from ``length`` on (rollback for speculation and replays).

        Rule for windowed layers: a rollback is possible while every slot the next position
        attends to (the ``window - 1`` before ``length``) is still in the ring, which holds the
        newest ``size`` slots written. Rolling back at most ``min(window, ROLLBACK_SLACK)``
        positions always is; deeper rollbacks are refused with ``ValueError`` (replay instead).
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        for index, window in enumerate(self.windows):
            size = self.keys[index].shape[2]
            if window is None or self.length <= size:
                continue
            if self.length - size > max(0, length - window + 1):
                raise ValueError(
                    f"cannot roll back layer {self.start + index} from {self.length} to {length} positions: its "
                    f"sliding-window ring keeps {size} slots, so at most {size - window + 1} positions can be rolled "
                    "back; replay the session from the start instead"
                )
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _layer_size(capacity: int, window: int | None) -> int:
    return capacity if window is None else min(capacity, ring_size(window))


def ring_slots(size: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The slot each index of a ring of ``size`` holds after ``length`` slots were written (-1: none)."""
    index = torch.arange(size, device=device)
    slots = length - 1 - (length - 1 - index) % size  # the newest slot s < length with s % size == index
    return torch.where(slots >= 0, slots, -1)


def positions_for(pad_lengths: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Rotary positions [B, T] of slots ``[offset, offset + length)``; padding slots get 0."""
    slots = torch.arange(offset, offset + length, device=pad_lengths.device)
    return (slots[None, :] - pad_lengths[:, None]).clamp_min(0)


def attention_mask(
    pad_lengths: torch.Tensor,
    offset: int,
    length: int,
    window: int | None = None,
    key_slots: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, S]: causal, padding keys hidden; None when nothing is hidden.

    Keys are slots ``[0, offset + T)`` in order, or ``key_slots`` ([S], -1 for an empty column)
    when a windowed layer's ring holds them out of order.
    ``window``: a query also does not see keys ``window`` or more slots behind it (sliding-window
    attention; slots and positions differ by the same padding, so slot distance is position distance).
    A padding slot may see itself, so its row is never empty (an all-masked row makes NaNs that
    would then be rejected on the wire); its output is never used by real positions.
    """
    total = offset + length
    if (key_slots is None and length == 1 and not bool(pad_lengths.any())
            and (window is None or total <= window)):
        return None  # one new position without padding sees every key: the common decode step
    queries = torch.arange(offset, total, device=pad_lengths.device)[:, None]  # [T, 1]
    if key_slots is None:
        keys = torch.arange(total, device=pad_lengths.device)[None, :]  # [1, S]
    else:
        keys = key_slots.to(pad_lengths.device)[None, :]
    causal = (keys <= queries) & (keys >= 0)  # [T, S]
    if window is not None:
        causal &= keys > queries - window
    not_padding = keys[None] >= pad_lengths[:, None, None]  # [B, 1, S]
    return ((causal[None] & not_padding) | (keys == queries)[None])[:, None]  # [B, 1, T, S]
