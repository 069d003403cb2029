"""How a long run of positions is cut into messages that every peer accepts.

A peer refuses a step whose tensor is over its message cap (48 MiB by default: about 1,536
positions at hidden size 8192 in float32), and a client's own gRPC channel refuses to send or
receive past ``max_message_bytes``. Replays, re-runs of checks, long prompts and ``History``
read-backs can all be longer than that, so they go in pieces of at most ``positions_per_message``.

Where the pieces fall matters for replays: a peer computes each message in its own prefill chunks,
so a replay that starts and ends its messages where the original steps did rebuilds a prefill's
cache exactly as it was first computed. ``replay_pieces`` keeps every multi-position step (a
prompt, a chunk of one, a speculative draft) in messages of its own, and merges runs of one-position
decode steps, which one pass per position would make slow to replay, up to the cap. Merged steps
rebuild the cache within float tolerance, not bit for bit (a matmul rounds a row differently beside
other rows); batch-invariant clients (``ClientConfig.batch_invariant``) do not merge them.
"""

from __future__ import annotations

from collections.abc import Sequence

# Bytes of each message kept for everything but the tensor (framing, rope lengths, step fields).
MESSAGE_OVERHEAD_BYTES = 4096
ROPE_LENGTH_BYTES = 10  # one varint rope length, at most


def positions_per_message(batch: int, width: int, itemsize: int, max_bytes: int) -> int:
    """How many positions of a [batch, T, width] tensor of ``itemsize``-byte values fit one message."""
    per_position = batch * width * itemsize + ROPE_LENGTH_BYTES
    return max(1, (max_bytes - MESSAGE_OVERHEAD_BYTES) // per_position)


def even_pieces(start: int, end: int, most: int) -> list[tuple[int, int]]:
    """``[start, end)`` in consecutive pieces of at most ``most`` positions."""
    return [(position, min(end, position + most)) for position in range(start, end, max(1, most))]


def replay_pieces(boundaries: Sequence[int], end: int, most: int, merge_decode: bool = True) -> list[tuple[int, int]]:
    """``[0, end)`` in pieces of at most ``most`` positions that begin at original step boundaries.

    ``boundaries``: the positions where the original steps began (sorted; 0 first). A step of
    several positions is sent alone (split at ``most`` when longer); consecutive one-position steps
    are merged unless ``merge_decode`` is False. Positions past the last boundary count as one step.
    """
    starts = sorted({b for b in boundaries if 0 <= b < end} | {0})
    steps = [(a, b) for a, b in zip(starts, [*starts[1:], end], strict=True)]
    pieces: list[tuple[int, int]] = []
    run_start: int | None = None  # a run of merged one-position steps, not yet closed
    for a, b in steps:
        if b - a == 1 and merge_decode:
            if run_start is None:
                run_start = a
            if b - run_start >= most:
                pieces.append((run_start, b))
                run_start = None
            continue
        if run_start is not None:
            pieces.append((run_start, a))
            run_start = None
        pieces.extend(even_pieces(a, b, most))
    if run_start is not None:
        pieces.append((run_start, end))
    return pieces
