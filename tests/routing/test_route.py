"""Route finding over hand-built and simulated swarms: pure, so no DHT is needed."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from brigade.protocol.errors import MissingLayersError
from brigade.protocol.records import PeerRecord
from brigade.routing.route import Hop, find_route, missing_spans

MODEL = "test/model"
NUM_LAYERS = 16


def make_peer(
    name: str,
    start: int,
    end: int,
    *,
    state: str = "online",
    signed_at: float = 1.0,
    num_layers: int = NUM_LAYERS,
) -> PeerRecord:
    """A record for route tests; the ids and keys are placeholders, nothing here checks signatures."""
    return PeerRecord(
        peer_id=name,
        public_key="00" * 32,
        address=f"{name}:1",
        model_name=MODEL,
        start_layer=start,
        end_layer=end,
        num_layers=num_layers,
        dtype="float32",
        state=state,
        signed_at=signed_at,
    )


def plan(route: list[Hop]) -> list[tuple[str, int, int]]:
    return [(hop.peer.peer_id, hop.start, hop.end) for hop in route]


def assert_valid(route: list[Hop], start: int, end: int, *, exclude: frozenset[str] = frozenset()) -> None:
    assert route, "a non-empty range needs at least one hop"
    assert route[0].start == start and route[-1].end == end
    for hop, after in itertools.pairwise(route):
        assert hop.end == after.start
    for hop in route:
        assert hop.peer.start_layer <= hop.start < hop.end <= hop.peer.end_layer
        assert hop.peer.state == "online" and hop.peer.peer_id not in exclude


def test_exact_spans_chain_in_order() -> None:
    peers = [make_peer("c", 8, 12), make_peer("a", 0, 4), make_peer("b", 4, 8), make_peer("d", 12, 16)]
    assert plan(find_route(peers, 0, 16)) == [("a", 0, 4), ("b", 4, 8), ("c", 8, 12), ("d", 12, 16)]


def test_sub_range_of_a_span() -> None:
    peers = [make_peer("a", 0, 8), make_peer("b", 8, 16)]
    assert plan(find_route(peers, 4, 8)) == [("a", 4, 8)]
    assert plan(find_route(peers, 2, 11)) == [("a", 2, 8), ("b", 8, 11)]


def test_fewest_hops_wins_over_many_small_spans() -> None:
    small = [make_peer(f"s{i}", 2 * i, 2 * i + 2) for i in range(8)]
    big = [make_peer("left", 0, 10), make_peer("right", 6, 16)]
    route = find_route(small + big, 0, 16, rng=random.Random(0))
    assert_valid(route, 0, 16)
    assert plan(route) == [("left", 0, 10), ("right", 10, 16)]


def test_overlapping_spans_with_different_boundaries() -> None:
    peers = [make_peer("a", 0, 8), make_peer("b", 8, 16), make_peer("c", 4, 12)]
    assert plan(find_route(peers, 0, 16)) == [("a", 0, 8), ("b", 8, 16)]
    # the layers of a failed hop, re-routed: one peer when c is there, two sub-ranges when it is not
    assert plan(find_route(peers, 4, 12)) == [("c", 4, 12)]
    assert plan(find_route(peers, 4, 12, exclude={"c"})) == [("a", 4, 8), ("b", 8, 12)]


def test_exclude_and_leaving_peers_are_skipped() -> None:
    peers = [
        make_peer("a", 0, 16),
        make_peer("b", 0, 16, state="leaving"),
        make_peer("c", 0, 8),
        make_peer("d", 8, 16),
    ]
    for seed in range(10):
        assert plan(find_route(peers, 0, 16, rng=random.Random(seed))) == [("a", 0, 16)]
    assert plan(find_route(peers, 0, 16, exclude={"a"})) == [("c", 0, 8), ("d", 8, 16)]


def test_newest_record_of_a_peer_decides() -> None:
    online = make_peer("a", 0, 16, signed_at=1.0)
    leaving = make_peer("a", 0, 16, state="leaving", signed_at=2.0)
    with pytest.raises(MissingLayersError):
        find_route([online, leaving], 0, 16)
    assert plan(find_route([online, make_peer("a", 0, 16, signed_at=0.5)], 0, 16)) == [("a", 0, 16)]


def test_missing_layers_names_exactly_the_uncovered_spans() -> None:
    peers = [
        make_peer("a", 0, 4),
        make_peer("b", 2, 6),
        make_peer("c", 9, 12),
        make_peer("x", 12, 14),
        make_peer("d", 14, 15, state="leaving"),
    ]
    assert missing_spans(peers, 0, 16, exclude={"x"}) == [(6, 9), (12, 16)]
    assert missing_spans(peers, 1, 5) == []
    assert missing_spans(peers, 7, 8) == [(7, 8)]
    with pytest.raises(MissingLayersError) as caught:
        find_route(peers, 0, 16, exclude={"x"})
    assert caught.value.missing == [(6, 9), (12, 16)]
    assert caught.value.model_name == MODEL
    assert "6:9, 12:16" in str(caught.value)


def test_empty_swarm_and_empty_range() -> None:
    with pytest.raises(MissingLayersError) as caught:
        find_route([], 0, 16)
    assert caught.value.model_name == "" and caught.value.missing == [(0, 16)]
    assert find_route([make_peer("a", 0, 16)], 5, 5) == []
    with pytest.raises(ValueError):
        find_route([make_peer("a", 0, 16)], 6, 5)


def test_hop_outside_the_span_is_refused() -> None:
    with pytest.raises(ValueError):
        Hop(make_peer("a", 4, 8), 2, 6)
    with pytest.raises(ValueError):
        Hop(make_peer("a", 4, 8), 6, 6)


def test_random_tie_break_spreads_over_equal_peers() -> None:
    firsts = [make_peer(f"f{i}", 0, 8) for i in range(4)]
    seconds = [make_peer(f"s{i}", 8, 16) for i in range(4)]
    rng = random.Random(1234)
    routes = [plan(find_route(firsts + seconds, 0, 16, rng=rng)) for _ in range(400)]
    assert all(len(route) == 2 for route in routes)
    for position in range(2):
        counts = Counter(route[position][0] for route in routes)
        assert len(counts) == 4 and min(counts.values()) > 60, counts  # 100 expected each
    # the same seed gives the same routes
    again = random.Random(1234)
    assert [plan(find_route(firsts + seconds, 0, 16, rng=again)) for _ in range(400)] == routes


def greedy_hop_count(peers: list[PeerRecord], start: int, end: int) -> int:
    """Fewest hops by the classic furthest-reach greedy: an independent check of find_route."""
    position, hops = start, 0
    while position < end:
        position = max(min(p.end_layer, end) for p in peers if p.start_layer <= position < p.end_layer)
        hops += 1
    return hops


def test_thousand_peer_random_swarm() -> None:
    rng = random.Random(7)
    num_layers = 80
    peers = []
    for i in range(1000):
        length = rng.randint(1, 20)
        start = rng.randint(0, num_layers - length)
        state = "leaving" if rng.random() < 0.1 else "online"
        peers.append(make_peer(f"p{i}", start, start + length, state=state, num_layers=num_layers))
    exclude = frozenset(f"p{i}" for i in range(0, 1000, 7))
    online = [p for p in peers if p.state == "online" and p.peer_id not in exclude]
    assert missing_spans(peers, 0, num_layers, exclude=exclude) == []

    for start, end in [(0, num_layers), (13, 57), (40, 41)]:
        route = find_route(peers, start, end, exclude=exclude, rng=rng)
        assert_valid(route, start, end, exclude=exclude)
        assert len(route) == greedy_hop_count(online, start, end)
