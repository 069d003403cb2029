"""Which work the next pass over the span computes: a pure function over the steps that are ready.

Continuous batching: every decode step that is ready joins the next pass (one forward over the
span for all of them: the weights are read once, which is what a decode step costs while memory
bound). A long prefill is cut into chunks, and each pass takes at most one chunk of it next to
the decode steps, so one session's 2,000-token prompt never stalls everyone else's next token.
Passes are limited by a token budget; the oldest work goes first, so nothing starves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DECODE_SIZED = 8  # steps of at most this many positions are decode steps: never chunked, batched first
# Batch-invariant mode: prefill chunks of this many positions from each step's start, whatever a peer's
# --prefill-chunk-tokens, so that every peer cuts the same step the same way (a replay repeats the shapes).
INVARIANT_CHUNK_TOKENS = 512


@dataclass
class WorkItem:
    """One step of one session (or one stateless pass), from arrival until its last chunk is done."""

    hidden: torch.Tensor  # [B, T, H] in the compute dtype, on the compute device
    pad_lengths: torch.Tensor  # [B]
    layers: tuple[int, int]
    session: Any = None  # peer.sessions.Session; None for a stateless pass
    start_position: int = 0  # the cache is rolled back to this before the first chunk
    capacity: int = 0  # cache capacity to grow to before the first chunk
    chunk_tokens: int = 0  # positions per chunk (0: the whole step at once)
    rope_lengths: torch.Tensor | None = None  # [T] call length per position (length-dependent ropes only)
    # Called on the compute thread for each computed chunk: (item, output [B, n, H] on CPU, offset, n, compute_ms).
    on_chunk: Callable[[WorkItem, torch.Tensor, int, int, float], None] | None = None
    on_error: Callable[[WorkItem, BaseException], None] | None = None
    client: str = ""  # who asked for it (a session's owner, a Forward's requester): the queue's per-client bound
    cancelled: bool = False  # set on the event loop when nobody waits for it any more (deadline, call cancelled)
    enqueued_at: float = field(default_factory=time.perf_counter)
    done: int = 0  # positions computed so far
    turn_at: float = 0.0  # batch-invariant mode: when its last chunk ran (0: not yet; its turn is its arrival)
    started_at: float | None = None  # when its first chunk began

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    @property
    def remaining(self) -> int:
        return self.length - self.done

    @property
    def abandoned(self) -> bool:
        """Nobody will read its results: its call ended, or its session was closed (pages released).
        Computing it would only burn the compute thread (and grow a cache nobody pays for)."""
        return self.cancelled or (self.session is not None and bool(getattr(self.session, "closed", False)))

    @property
    def decode_sized(self) -> bool:
        return self.length <= DECODE_SIZED

    @property
    def key(self) -> object:
        """Items of one session must run one at a time and in order."""
        return id(self.session) if self.session is not None else id(self)


def plan_batch(ready: list[WorkItem], max_tokens: int, invariant: bool = False) -> list[tuple[WorkItem, int]]:
    """The items the next pass computes and how many of each one's positions, oldest first.

    ``invariant`` (batch-invariant mode): one item alone (``_invariant_pick``). A row's floats then
    depend only on its own step, never on who else was queued: a CPU or GPU matmul rounds a row
    differently with another number of rows beside it.

    All items of a pass share one layer range (that of the oldest ready item). Decode steps come
    first, then chunks of prefills, within ``max_tokens`` (batch x positions) in all; the oldest
    item always runs, even alone over budget. A session appears at most once per pass, and only
    its oldest item, so its steps keep their order.
    """
    if not ready:
        return []
    if invariant:
        return [_invariant_pick(ready)]
    ordered = sorted(ready, key=lambda item: item.enqueued_at)
    layers = ordered[0].layers
    seen: set[object] = set()
    firsts = []
    for item in ordered:
        if item.key in seen:
            continue
        seen.add(item.key)
        if item.layers == layers:
            firsts.append(item)
    plan: list[tuple[WorkItem, int]] = []
    budget = max_tokens
    decodes = [item for item in firsts if item.decode_sized]
    prefills = [item for item in firsts if not item.decode_sized]
    for item in decodes:
        cost = item.hidden.shape[0] * item.remaining
        if plan and cost > budget:
            continue
        plan.append((item, item.remaining))
        budget -= cost
    for item in prefills:
        batch = item.hidden.shape[0]
        positions = item.remaining if item.chunk_tokens <= 0 else min(item.remaining, item.chunk_tokens)
        if plan:
            positions = min(positions, budget // batch)
            if positions <= 0:
                break
        plan.append((item, positions))
        budget -= batch * positions
    return plan


def _invariant_pick(ready: list[WorkItem]) -> tuple[WorkItem, int]:
    """Batch-invariant mode's next pass: one item, and how many of its positions.

    A session step goes in chunks of ``INVARIANT_CHUNK_TOKENS`` from its start (the same on every
    peer, so a replay elsewhere repeats them); a stateless pass (``Forward``, no cache to continue)
    goes whole, as its answer must. Among each session's oldest item, the one whose turn is oldest
    runs: a prefill goes to the back after each chunk (``turn_at``), so decode steps queued behind a
    long prompt wait one chunk, not the whole prompt. Which item runs never changes its bits.
    """
    firsts: dict[object, WorkItem] = {}
    for item in sorted(ready, key=lambda item: item.enqueued_at):
        firsts.setdefault(item.key, item)
    chosen = min(firsts.values(), key=lambda item: item.turn_at or item.enqueued_at)
    if chosen.session is None:
        return chosen, chosen.remaining
    return chosen, min(chosen.remaining, INVARIANT_CHUNK_TOKENS)
