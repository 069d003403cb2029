"""Route finding for clients: which peers compute which layers, over a snapshot of the swarm.

Pure functions of the records they are given, with no I/O and no DHT: a refresher owns the
reading and hands snapshots in. That keeps them testable with thousands of simulated peers and
lets a client re-route a failed hop without waiting on the network.

A route is a shortest path over layer boundaries: from boundary ``p``, a usable peer whose span
holds layer ``p`` takes the chain to ``min(peer.end_layer, end)`` for the cost of one hop. (Ending
a hop before the peer's own end never saves a hop: any next peer that reaches further also holds
that later boundary.) Today every hop costs 1, so the route has the fewest hops; latency-aware
routing (compute time from throughput, plus round trips) comes later in its own issue and will
replace ``_hop_cost`` without changing the search. Ties are broken at random so that clients
spread their sessions over equally good peers instead of all piling onto the first one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from brigade.protocol.errors import MissingLayersError
from brigade.protocol.records import PeerRecord


@dataclass(frozen=True)
class Hop:
    """One peer of a route, and the layers ``[start, end)`` it computes (inside its span)."""

    peer: PeerRecord
    start: int
    end: int

    def __post_init__(self) -> None:
        if not (self.start < self.end and self.peer.spans(self.start, self.end)):
            raise ValueError(
                f"hop {self.start}:{self.end} is empty or outside {self.peer.peer_id}'s span "
                f"{self.peer.start_layer}:{self.peer.end_layer}"
            )


def _check_range(start: int, end: int) -> None:
    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start <= end, got layers {start}:{end}")


def _usable(records: Iterable[PeerRecord], exclude: Collection[str]) -> list[PeerRecord]:
    """Online, non-excluded records, the newest one per peer (an older snapshot may be merged in)."""
    newest: dict[str, PeerRecord] = {}
    for record in records:
        held = newest.get(record.peer_id)
        if held is None or record.signed_at > held.signed_at:
            newest[record.peer_id] = record
    excluded = set(exclude)
    return [
        record
        for record in newest.values()
        if record.state == "online"
        and record.peer_id not in excluded
        and record.start_layer < record.end_layer
    ]


def _missing(usable: list[PeerRecord], start: int, end: int) -> list[tuple[int, int]]:
    spans = sorted((max(r.start_layer, start), min(r.end_layer, end)) for r in usable)
    missing = []
    covered_to = start  # every layer in [start, covered_to) is served
    for span_start, span_end in spans:
        if span_start >= span_end:
            continue  # outside [start, end)
        if span_start > covered_to:
            missing.append((covered_to, span_start))
        covered_to = max(covered_to, span_end)
    if covered_to < end:
        missing.append((covered_to, end))
    return missing


def missing_spans(
    records: Iterable[PeerRecord], start: int, end: int, *, exclude: Collection[str] = ()
) -> list[tuple[int, int]]:
    """The merged half-open spans of ``[start, end)`` that no online, non-excluded peer serves."""
    _check_range(start, end)
    return _missing(_usable(records, exclude), start, end)


def _hop_cost(peer: PeerRecord, start: int, end: int) -> float:
    """What one hop adds to a route. 1 per hop = fewest hops; latency-aware routing replaces this."""
    return 1.0


def find_route(
    records: Iterable[PeerRecord],
    start: int,
    end: int,
    *,
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
) -> list[Hop]:
    """A chain of hops covering ``[start, end)`` exactly, in order, at the lowest total cost.

    Skips "leaving" peers and the peer ids in ``exclude`` (banned after a failure). Among equally
    cheap next hops it picks at random with ``rng`` (seed it for reproducible tests). Raises
    MissingLayersError naming the uncovered spans when no chain exists.
    """
    _check_range(start, end)
    records = list(records)
    usable = _usable(records, exclude)
    if start == end:
        return []
    rng = rng if rng is not None else random.Random()

    # by_layer[i]: the usable peers whose span holds layer start + i, i.e. can start a hop there.
    by_layer: list[list[PeerRecord]] = [[] for _ in range(end - start)]
    for record in usable:
        for layer in range(max(record.start_layer, start), min(record.end_layer, end)):
            by_layer[layer - start].append(record)

    def hops_from(position: int) -> list[tuple[PeerRecord, int]]:
        return [(peer, min(peer.end_layer, end)) for peer in by_layer[position - start]]

    # cost_to_end[p]: the cheapest total cost from boundary p to end; hops only move forward, so
    # one pass from the end backwards settles every boundary (an acyclic shortest-path problem).
    cost_to_end = [math.inf] * (end - start + 1)
    cost_to_end[end - start] = 0.0
    for position in range(end - 1, start - 1, -1):
        for peer, hop_end in hops_from(position):
            cost = _hop_cost(peer, position, hop_end) + cost_to_end[hop_end - start]
            cost_to_end[position - start] = min(cost_to_end[position - start], cost)

    if math.isinf(cost_to_end[0]):
        model_name = records[0].model_name if records else ""
        raise MissingLayersError(model_name, _missing(usable, start, end))

    route: list[Hop] = []
    position = start
    while position < end:
        best = cost_to_end[position - start]
        choices = [
            (peer, hop_end)
            for peer, hop_end in hops_from(position)
            if math.isclose(_hop_cost(peer, position, hop_end) + cost_to_end[hop_end - start], best)
        ]
        peer, hop_end = rng.choice(choices)
        route.append(Hop(peer, position, hop_end))
        position = hop_end
    return route
