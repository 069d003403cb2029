"""A finished window chosen for checking, and what each hop's check of it needs, taken when it finished."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from brigade.client.hops import HopStream
from brigade.client.verify.evidence import Link


@dataclass
class HopSnapshot:
    """What one hop's check needs, taken when its window finished."""

    stream: HopStream
    links: list[Link]  # its attestations tiling [0, b) (empty when some position has none)
    logged_inputs: list[torch.Tensor] | None  # what this client sent it (positions from 0 on), when it holds them
    previous: HopStream | None = None  # otherwise its inputs are this hop's kept outputs
    previous_links: list[Link] = field(default_factory=list)
    unusable: str = ""  # why its inputs cannot be had (the reason the check is skipped for), if so


@dataclass
class Window:
    start: int
    end: int
    rollback_seq: int  # rollbacks counted when it finished: a later one below ``end`` supersedes it
    hops: list[HopSnapshot]
    # The call length of each position [0, end) when it finished (length-dependent ropes; [] otherwise): a
    # re-run sends these, not the session's live ones, which a later rollback or recompute rewrites.
    rope_lengths: list[int] = field(default_factory=list)
