"""Which layers a joining peer should host: a pure function over the records of the swarm.

The peer takes the consecutive span of the length that fits its memory that most raises the
swarm's weakest point (the rule and the throughput model are in ``rebalance`` and ``snapshot``):
first a span that covers as many uncovered layers as it can, then the one that raises the layer
with the least total throughput the most, then the rest of the weak layers.
"""

from __future__ import annotations

from collections.abc import Iterable

from brigade.protocol.records import PeerRecord
from brigade.routing.rebalance import best_start
from brigade.routing.snapshot import SwarmSnapshot


def layer_coverage(records: Iterable[PeerRecord], num_layers: int) -> list[int]:
    """Live (online) peers per layer."""
    coverage = [0] * num_layers
    for record in records:
        if record.state != "online":
            continue
        for layer in range(max(0, record.start_layer), min(num_layers, record.end_layer)):
            coverage[layer] += 1
    return coverage


def choose_span(
    records: Iterable[PeerRecord], num_layers: int, span_length: int, *, throughput: float | None = None
) -> tuple[int, int]:
    """The half-open span of ``span_length`` layers where a new peer helps the swarm most.

    ``throughput`` is the new peer's tokens/s per layer; None (not measured yet) counts it as the
    swarm's median peer.
    """
    if num_layers <= 0:
        raise ValueError("the model has no layers")
    span_length = max(1, min(span_length, num_layers))
    snapshot = SwarmSnapshot.from_records(records, num_layers)
    if throughput is None or throughput <= 0:
        measured = sorted(peer.throughput for peer in snapshot.peers)
        throughput = measured[len(measured) // 2] if measured else 1.0
    start = best_start(snapshot, span_length, throughput)
    return start, start + span_length
