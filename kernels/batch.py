"""Several sessions' new positions computed as one pass over a span: the seam between batching and layers.

A peer batches the steps of concurrent sessions (continuous batching). Each session brings its
own hidden states, left padding, KV cache and cache length, so their shapes are ragged. Layers
see one flat token matrix ``[N, H]`` (every session's positions, concatenated) for the work that
does not care which session a token belongs to (norms, projections, MLPs: the bulk of the
FLOPs), and call ``SegmentBatch.attend`` for the one part that does: attention against each
session's own cache, with its own positions and mask. No cache is ever padded or gathered.

Model families plug in here: a family's attention computes q, k, v (with its own biases, norms,
rotary variant) and hands them to ``attend`` with its options (sliding window, logit soft-cap,
scale); everything session-shaped stays in this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from brigade.kernels.cache import KVCache, attention_mask, positions_for

ALIBI_BIAS_ELEMENTS = 1 << 22  # most bias values one block of ALiBi queries builds (16 MiB in fp32)


@dataclass
class Segment:
    """One session's new positions in a batched pass."""

    hidden: torch.Tensor  # [B, T, H]
    pad_lengths: torch.Tensor  # [B] int64: left padding of each sequence
    cache: KVCache | None = None  # None: a stateless pass over whole sequences, nothing kept
    # [T] int64: length of the forward call each new position belongs to (kernels/rope.py); None:
    # this segment is the whole call. Only length-dependent rope variants (dynamic, longrope) read it.
    rope_lengths: torch.Tensor | None = None


class SegmentBatch:
    """Where each segment's rows sit in the flat token matrix, and what its attention needs.

    Built once per pass and shared by every layer: positions, rotary angles and masks are
    computed here once, not per layer.
    """

    def __init__(self, segments: list[Segment]):
        if not segments:
            raise ValueError("a batch needs at least one segment")
        self.segments = segments
        self.offsets = [seg.cache.length if seg.cache is not None else 0 for seg in segments]
        self.shapes = [(seg.hidden.shape[0], seg.hidden.shape[1]) for seg in segments]  # (B, T)
        self.row_starts: list[int] = []
        rows = 0
        for batch, length in self.shapes:
            self.row_starts.append(rows)
            rows += batch * length
        self.num_rows = rows
        positions = [positions_for(seg.pad_lengths, offset, seg.hidden.shape[1]).reshape(-1)
                     for seg, offset in zip(segments, self.offsets, strict=True)]
        self.positions = positions[0] if len(positions) == 1 else torch.cat(positions)  # [N]
        self._masks: dict[tuple[int, int | None, int | None], torch.Tensor | None] = {}
        self._rope_lengths: torch.Tensor | None = None

    @property
    def rope_lengths(self) -> torch.Tensor:
        """The call length of every flat row [N]: a segment without its own is one whole call, whose
        length is transformers' ``max(position_ids) + 1`` (its last slot past the least padding)."""
        if self._rope_lengths is None:
            per_segment = []
            for seg, offset, (batch, length) in zip(self.segments, self.offsets, self.shapes, strict=True):
                lengths = seg.rope_lengths
                if lengths is None:
                    whole = offset + length - int(seg.pad_lengths.min())
                    lengths = torch.full((length,), whole, dtype=torch.long)
                per_segment.append(lengths.to(self.positions.device)[None, :].expand(batch, length).reshape(-1))
            self._rope_lengths = per_segment[0] if len(per_segment) == 1 else torch.cat(per_segment)
        return self._rope_lengths

    def flatten(self) -> torch.Tensor:
        """Every segment's hidden states as one ``[N, H]`` matrix (a view when there is one segment)."""
        flat = [seg.hidden.reshape(-1, seg.hidden.shape[-1]) for seg in self.segments]
        return flat[0] if len(flat) == 1 else torch.cat(flat)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``flatten``: one ``[B, T, H]`` tensor per segment."""
        return [flat[start : start + batch * length].view(batch, length, -1)
                for start, (batch, length) in zip(self.row_starts, self.shapes, strict=True)]

    def _mask(self, index: int, window: int | None, key_slots: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of segment ``index``, built once per pass for every layer that shares its shape."""
        # Within a pass, a windowed layer's ring layout follows from its window and column count alone.
        key = (index, window, None if key_slots is None else key_slots.shape[0])
        if key not in self._masks:
            seg = self.segments[index]
            self._masks[key] = attention_mask(seg.pad_lengths, self.offsets[index], seg.hidden.shape[1],
                                              window=window, key_slots=key_slots)
        return self._masks[key]

    def _alibi_attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None, slopes: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Attention with ALiBi: each score gains ``slope[head] * key position`` (BLOOM).

        A key's position is its slot past the row's padding, as transformers' ``build_alibi_tensor``
        counts it from the attention mask (keys are in slot order: ALiBi layers have no window).
        The bias is per head and per key, so it is built for a block of queries at a time, never
        more than ``ALIBI_BIAS_ELEMENTS`` values, however long the prefill and the session.
        """
        seg = self.segments[index]
        batch, heads, length, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        key_positions = (torch.arange(keys, device=q.device)[None, :] - seg.pad_lengths[:, None]).clamp_min(0)
        bias = (slopes.float()[None, :, None, None] * key_positions[:, None, None, :].float()).to(q.dtype)  # [B,h,1,S]
        rows = max(1, ALIBI_BIAS_ELEMENTS // max(1, batch * heads * keys))
        outputs = []
        for begin in range(0, length, rows):
            end = min(length, begin + rows)
            block = bias if mask is None else bias.masked_fill(~mask[:, :, begin:end], float("-inf"))
            outputs.append(F.scaled_dot_product_attention(q[:, :, begin:end], k, v, attn_mask=block, scale=scale))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # [B, heads, T, D]

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        alibi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of every segment against its own cache of global layer ``layer``.

        q: [N, heads, D], k and v: [N, kv_heads, D] with rotary already applied. Writes each
        segment's k and v into its cache at its offset, then attends over what the cache holds
        (every earlier slot, or a windowed layer's ring; see ``KVCache.update``).
        ``window``: keys further back than this many positions are hidden (sliding window).
        ``softcap``: scores pass through ``softcap * tanh(s / softcap)`` (Gemma 2). ``alibi``
        ([heads] slopes): each score gains ``slope * key position`` (BLOOM). Returns [N, heads * D].
        """
        heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        outputs = []
        for index, (seg, offset) in enumerate(zip(self.segments, self.offsets, strict=True)):
            batch, length = self.shapes[index]
            rows = slice(self.row_starts[index], self.row_starts[index] + batch * length)
            q_s = q[rows].view(batch, length, heads, head_dim).transpose(1, 2)  # [B, heads, T, D]
            k_s = k[rows].view(batch, length, kv_heads, head_dim).transpose(1, 2)  # [B, kv, T, D]
            v_s = v[rows].view(batch, length, kv_heads, head_dim).transpose(1, 2)
            key_slots = None
            if seg.cache is not None:
                k_s, v_s, key_slots = seg.cache.update(layer, offset, k_s, v_s)  # [B, kv, S, D]
            mask = self._mask(index, window, key_slots)
            if alibi is not None:
                out = self._alibi_attention(index, q_s, k_s, v_s, mask, alibi, scale)
            elif softcap is None:
                out = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, scale=scale,
                                                     enable_gqa=kv_heads != heads)  # [B, heads, T, D]
            else:
                out = _softcapped_attention(q_s, k_s, v_s, mask, scale, softcap)
            outputs.append(out.transpose(1, 2).reshape(batch * length, heads * head_dim))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def advance(self) -> None:
        """Moves every cache's length past the positions this pass wrote."""
        for seg, offset in zip(self.segments, self.offsets, strict=True):
            if seg.cache is not None:
                seg.cache.length = offset + seg.hidden.shape[1]


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
    softcap: float,
) -> torch.Tensor:
    """Plain attention with tanh soft-capping of the scores, which SDPA cannot express."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, heads, T, S]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return weights @ v
