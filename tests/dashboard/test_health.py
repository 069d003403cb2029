"""Judging coverage and health from records and probes: pure functions over small factories."""

from __future__ import annotations

from brigade_dashboard import peer_record

from brigade.dashboard.health import layer_ranges, model_view, quantiles
from brigade.dashboard.probe import ProbeResult
from brigade.protocol.identity import Identity

UP = ProbeResult(True, rtt_ms=1.0, state="online", free_cache_tokens=100, open_sessions=2)
DOWN = ProbeResult(False, error="UNAVAILABLE: connection refused")


def record(start: int, end: int, num_layers: int = 6, **fields: object):
    return peer_record(Identity.generate(), "m", start, end, num_layers, **fields)


def test_layer_ranges_and_quantiles() -> None:
    assert layer_ranges([5, 0, 1, 2, 2]) == [(0, 3), (5, 6)]
    assert layer_ranges([]) == []
    assert quantiles([]) == {}
    assert quantiles([float(v) for v in range(1, 101)]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}


def test_healthy_when_every_layer_has_an_online_peer() -> None:
    view = model_view("m", [(record(0, 3, throughput=10), UP), (record(3, 6, throughput=20), UP),
                            (record(2, 4, throughput=5), UP)], seen_at=0)
    assert view.verdict == "healthy" and view.gaps == [] and view.layers_covered == 6
    assert [layer.peers for layer in view.layers] == [1, 1, 2, 2, 1, 1]
    assert [layer.throughput for layer in view.layers] == [10, 10, 15, 25, 20, 20]
    assert [layer.announced for layer in view.layers] == [1, 1, 2, 2, 1, 1]
    assert view.weakest_layer_throughput == 10 and view.min_peers_per_layer == 1
    assert view.peers_online == 3 and view.probe_rtt_ms == {"p50": 1.0, "p90": 1.0, "p99": 1.0}
    assert any("no spare peer for layers 0:2, 4:6" in warning for warning in view.warnings)
    assert all(peer.free_cache_tokens == 100 and peer.open_sessions == 2 for peer in view.peers)  # the probe's


def test_unreachable_and_leaving_peers_do_not_count() -> None:
    view = model_view("m", [(record(0, 2), UP), (record(2, 4), DOWN), (record(4, 6, state="leaving"), UP),
                            (record(4, 6), ProbeResult(True, 1.0, state="leaving"))], seen_at=0)
    assert view.verdict == "broken" and view.gaps == [(2, 6)] and view.layers_covered == 2
    statuses = sorted(peer.status for peer in view.peers)
    assert statuses == ["leaving", "leaving", "online", "unreachable"]
    unreachable = next(peer for peer in view.peers if peer.status == "unreachable")
    assert unreachable.reachable is False and "refused" in unreachable.probe_error
    assert unreachable.free_cache_tokens == 4096  # from the record when the probe failed
    assert any("1 of 4 peers do not answer" in warning for warning in view.warnings)


def test_unprobed_records_are_trusted() -> None:
    view = model_view("m", [(record(0, 6), None)], seen_at=0)
    assert view.verdict == "healthy" and view.peers[0].reachable is None and view.probe_rtt_ms == {}


def test_peers_that_disagree_on_the_layer_count_are_not_counted() -> None:
    view = model_view("m", [(record(0, 6), UP), (record(0, 3), UP), (record(6, 8, num_layers=8), UP)], seen_at=0)
    assert view.num_layers == 6 and len(view.layers) == 6 and view.peers_online == 2
    assert any("another layer count (8 instead of 6)" in warning for warning in view.warnings)


def test_empty_model_is_broken() -> None:
    view = model_view("m", [], seen_at=0)
    assert view.verdict == "broken" and view.num_layers == 0 and view.layers == []
