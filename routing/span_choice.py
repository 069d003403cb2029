"""Which layers a joining peer should host: a pure function over a snapshot of the swarm.

For now the rule is the simplest one that keeps a swarm covered: take the window of consecutive
layers whose least-served layer has the fewest live peers (then the fewest in total, then the
lowest start). Throughput-weighted choice and rebalancing come with the balance issue.
"""

from __future__ import annotations

from collections.abc import Iterable

from brigade.protocol.records import PeerRecord


def layer_coverage(records: Iterable[PeerRecord], num_layers: int) -> list[int]:
    """Live (online) peers per layer."""
    coverage = [0] * num_layers
    for record in records:
        if record.state != "online":
            continue
        for layer in range(max(0, record.start_layer), min(num_layers, record.end_layer)):
            coverage[layer] += 1
    return coverage


def choose_span(records: Iterable[PeerRecord], num_layers: int, span_length: int) -> tuple[int, int]:
    """The half-open span of ``span_length`` layers that most needs another peer."""
    if num_layers <= 0:
        raise ValueError("the model has no layers")
    span_length = max(1, min(span_length, num_layers))
    coverage = layer_coverage(records, num_layers)
    best_start = min(
        range(num_layers - span_length + 1),
        key=lambda start: (min(coverage[start : start + span_length]), sum(coverage[start : start + span_length]),
                           start),
    )
    return best_start, best_start + span_length
