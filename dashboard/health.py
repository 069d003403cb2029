"""Judging a model's health from its records and probes: pure functions, no I/O.

A layer counts as served only by peers that are online *now*: announced online, and (when
probed) answering as themselves. A record alone proves little (it lives up to its ttl after its
peer died), so a peer that does not answer is shown but not counted, and a model is healthy only
when every layer has at least one peer that counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from brigade.dashboard.probe import ProbeResult
from brigade.dashboard.schema import HistoryPoint, LayerView, ModelView, PeerView
from brigade.protocol.records import PeerRecord

SHORT_ID_CHARS = 8
_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def short_id(peer_id: str) -> str:
    return peer_id[-SHORT_ID_CHARS:]


def layer_ranges(layers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted layer numbers -> half-open ranges: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    ranges: list[tuple[int, int]] = []
    for layer in sorted(set(layers)):
        if ranges and ranges[-1][1] == layer:
            ranges[-1] = (ranges[-1][0], layer + 1)
        else:
            ranges.append((layer, layer + 1))
    return ranges


def format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{start}:{end}" for start, end in ranges)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 of ``values``; {} when there are none."""
    if not values:
        return {}
    ordered = sorted(values)
    return {name: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
            for name, q in _QUANTILES.items()}


def peer_view(record: PeerRecord, probe: ProbeResult | None, seen_at: float) -> PeerView:
    """What the page shows of one peer whose record the last crawl found."""
    leaving = record.state == "leaving" or (probe is not None and probe.reachable and probe.state == "leaving")
    if leaving:
        status = "leaving"
    elif probe is not None and not probe.reachable:
        status = "unreachable"
    else:
        status = "online"
    fresh_cache = probe.free_cache_tokens if probe is not None and probe.reachable else None
    return PeerView(
        peer_id=record.peer_id,
        short_id=short_id(record.peer_id),
        address=record.address,
        start_layer=record.start_layer,
        end_layer=record.end_layer,
        dtype=record.dtype,
        quantization=record.quantization,
        throughput=record.throughput,
        free_cache_tokens=record.free_cache_tokens if fresh_cache is None else fresh_cache,
        open_sessions=probe.open_sessions if probe is not None and probe.reachable else None,
        software_version=record.software_version,
        protocol_version=record.version,
        announced_state=record.state,
        status=status,
        reachable=None if probe is None else probe.reachable,
        rtt_ms=None if probe is None or probe.rtt_ms is None else round(probe.rtt_ms, 3),
        probe_error="" if probe is None else probe.error,
        started_at=record.started_at,
        last_announced_at=record.signed_at,
        last_seen_at=seen_at,
        expires_at=record.expires_at,
        tls=bool(record.tls_cert),
        relay_peer_id=record.relay_peer_id,
    )


def gone(view: PeerView) -> PeerView:
    """A peer whose record is no longer in the DHT, as last seen."""
    return view.model_copy(update={"status": "gone", "reachable": None, "rtt_ms": None, "probe_error": "",
                                   "open_sessions": None})


def model_view(
    name: str,
    present: Sequence[tuple[PeerRecord, ProbeResult | None]],
    seen_at: float,
    *,
    gone_peers: Sequence[PeerView] = (),
    history: Sequence[HistoryPoint] = (),
    records_dropped: int = 0,
    read_error: str = "",
) -> ModelView:
    """The whole picture of one model: coverage per layer, verdict, figures and warnings."""
    votes = Counter(record.num_layers for record, _ in present)
    num_layers = max(votes, key=lambda n: (votes[n], n)) if votes else 0
    peers = [peer_view(record, probe, seen_at) for record, probe in present]
    odd = {record.peer_id for record, _ in present if record.num_layers != num_layers}
    counted = [view for view in peers if view.status == "online" and view.peer_id not in odd]

    counts = [0] * num_layers
    throughput = [0.0] * num_layers
    announced = [0] * num_layers
    for view in peers:
        if view.peer_id not in odd:
            for layer in range(view.start_layer, view.end_layer):
                announced[layer] += 1
    for view in counted:
        for layer in range(view.start_layer, view.end_layer):
            counts[layer] += 1
            throughput[layer] += view.throughput
    gaps = layer_ranges(layer for layer, count in enumerate(counts) if count == 0)
    status_counts = Counter(view.status for view in peers)
    versions = Counter(view.software_version or "unknown" for view in peers)
    rtts = [view.rtt_ms for view in peers if view.rtt_ms is not None and view.reachable]

    warnings = []
    if read_error:
        warnings.append(f"the last crawl could not read this model ({read_error}); peers shown are from before")
    if num_layers and gaps:
        warnings.append(f"no online peer serves layers {format_ranges(gaps)}")
    elif num_layers and min(counts) == 1:
        lone = layer_ranges(layer for layer, count in enumerate(counts) if count == 1)
        warnings.append(f"no spare peer for layers {format_ranges(lone)}: one failure breaks the model")
    if status_counts["unreachable"]:
        warnings.append(f"{status_counts['unreachable']} of {len(peers)} peers do not answer the dashboard")
    if status_counts["leaving"]:
        warnings.append(f"{status_counts['leaving']} peers are leaving (draining)")
    if odd:
        other = sorted({record.num_layers for record, _ in present} - {num_layers})
        warnings.append(f"{len(odd)} peers announce another layer count ({', '.join(map(str, other))} instead of "
                        f"{num_layers}) and are not counted")
    if len(versions) > 1:
        warnings.append("mixed software versions: " + ", ".join(f"{v} ({n})" for v, n in sorted(versions.items())))
    if records_dropped:
        warnings.append(f"{records_dropped} records under this model's key failed validation and were skipped")

    ordered = sorted([*peers, *gone_peers], key=lambda view: (view.start_layer, view.end_layer, view.peer_id))
    return ModelView(
        name=name,
        num_layers=num_layers,
        verdict="healthy" if num_layers and not gaps else "broken",
        layers_covered=sum(1 for count in counts if count),
        gaps=gaps,
        min_peers_per_layer=min(counts, default=0),
        weakest_layer_throughput=round(min(throughput, default=0.0), 3),
        total_throughput=round(sum(view.throughput for view in counted), 3),
        peers_total=len(peers),
        peers_online=len(counted),
        peers_unreachable=status_counts["unreachable"],
        peers_leaving=status_counts["leaving"],
        records_dropped=records_dropped,
        read_error=read_error,
        versions=dict(sorted(versions.items())),
        probe_rtt_ms={key: round(value, 3) for key, value in quantiles(rtts).items()},
        warnings=warnings,
        layers=[LayerView(peers=count, throughput=round(value, 3), announced=claims)
                for count, value, claims in zip(counts, throughput, announced, strict=True)],
        peers=ordered,
        history=list(history),
    )


def history_point(view: ModelView, t: float) -> HistoryPoint:
    return HistoryPoint(t=t, peers_online=view.peers_online, total_throughput=view.total_throughput,
                        weakest_layer_throughput=view.weakest_layer_throughput)
