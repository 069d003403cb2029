"""A joining peer picks the span that most needs it."""

from __future__ import annotations

from brigade.protocol.records import PeerRecord
from brigade.routing.span_choice import choose_span, layer_coverage


def record(start: int, end: int, state: str = "online", index: int = 0) -> PeerRecord:
    return PeerRecord(peer_id=f"bp{index}-{start}-{end}", public_key="00", address="127.0.0.1:1", model_name="m",
                      start_layer=start, end_layer=end, num_layers=16, dtype="float32", state=state, signed_at=0.0)


def test_empty_swarm_starts_at_the_first_layer() -> None:
    assert choose_span([], 16, 4) == (0, 4)


def test_first_gap_is_filled() -> None:
    peers = [record(0, 4), record(4, 8), record(12, 16)]
    assert choose_span(peers, 16, 4) == (8, 12)
    assert layer_coverage(peers, 16)[8:12] == [0, 0, 0, 0]


def test_least_served_layers_win_and_leaving_peers_do_not_count() -> None:
    peers = [record(0, 8, index=1), record(0, 8, index=2), record(8, 16, index=3), record(8, 16, "leaving", index=4)]
    assert choose_span(peers, 16, 8) == (8, 16)
    assert choose_span(peers, 16, 32) == (0, 16)  # a peer that fits everything takes everything
