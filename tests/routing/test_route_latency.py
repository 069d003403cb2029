"""Latency-aware routes on synthetic snapshots: compute from throughput, network from pings, cache
penalties, the client's own measurements, forwarding, and spreading. Pure: no network."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter

import pytest

from brigade.protocol.records import PeerRecord
from brigade.routing.route import Hop, RouteCosts, find_route, route_ms

MODEL = "test/model"


def peer(
    name: str, start: int, end: int, throughput: float = 100.0, *, free: int = 10_000,
    pings: dict[str, float] | None = None, prefill: float = 0.0, layers: int = 16,
) -> PeerRecord:
    return PeerRecord(
        peer_id=name, public_key="00" * 32, address=f"{name}:1", model_name=MODEL, start_layer=start, end_layer=end,
        num_layers=layers, dtype="float32", throughput=throughput, prefill_throughput=prefill, free_cache_tokens=free,
        pings=pings or {}, signed_at=1.0,
    )


def plan(route: list[Hop]) -> list[tuple[str, int, int]]:
    return [(hop.peer.peer_id, hop.start, hop.end) for hop in route]


def test_lowest_latency_chain_is_not_the_fewest_hops() -> None:
    # One slow peer holds everything (16 layers at 50 tokens/s per layer: 320 ms a token); three fast
    # peers need three hops (1,000 tokens/s per layer: 16 ms of compute) but each hop costs a 10 ms
    # round trip. 46 ms beats 330 ms.
    peers = [peer("slow", 0, 16, 50), peer("a", 0, 6, 1000), peer("b", 6, 11, 1000), peer("c", 11, 16, 1000)]
    rtt = {name: 10.0 for name in ("slow", "a", "b", "c")}
    costs = RouteCosts(rtt_ms=rtt)
    route = find_route(peers, 0, 16, costs=costs)
    assert plan(route) == [("a", 0, 6), ("b", 6, 11), ("c", 11, 16)]
    assert route_ms(route, peers, costs) == pytest.approx(3 * 10 + 16 * 1.0)
    # Far away, the same three hops lose: at 150 ms a round trip, one hop of 320 ms is faster.
    far = RouteCosts(rtt_ms={"slow": 10.0, "a": 150.0, "b": 150.0, "c": 150.0})
    assert plan(find_route(peers, 0, 16, costs=far)) == [("slow", 0, 16)]


def test_a_slow_peers_tail_is_left_to_a_faster_one() -> None:
    # "wide" holds 0:12 slowly, "fast" holds 4:16: the best split hands over at layer 4, not at 12.
    peers = [peer("wide", 0, 12, 100), peer("fast", 4, 16, 1000)]
    assert plan(find_route(peers, 0, 16, costs=RouteCosts(rtt_ms={"wide": 5, "fast": 5}))) == [
        ("wide", 0, 4), ("fast", 4, 16)]


def test_a_fast_peer_that_is_full_is_avoided_unless_it_is_the_only_one() -> None:
    fast_full = peer("fast", 0, 16, 2000, free=0)
    slow_free = peer("slow", 0, 16, 200, free=4096)
    costs = RouteCosts(rtt_ms={"fast": 5, "slow": 5}, cache_tokens=512)
    assert plan(find_route([fast_full, slow_free], 0, 16, costs=costs)) == [("slow", 0, 16)]
    # With room, the fast one wins again.
    assert plan(find_route([peer("fast", 0, 16, 2000), slow_free], 0, 16, costs=costs)) == [("fast", 0, 16)]
    # A penalty, not a ban: when only the full peer holds layers 8:16, the route still goes through it.
    half = peer("half", 0, 8, 200, free=4096)
    assert plan(find_route([half, peer("fast", 8, 16, 2000, free=0)], 0, 16, costs=costs)) == [
        ("half", 0, 8), ("fast", 8, 16)]


def test_the_clients_own_measurements_correct_what_peers_announce() -> None:
    # "boast" announces 10x the throughput it delivers; once the client has measured it, it loses.
    peers = [peer("boast", 0, 16, 1000), peer("honest", 0, 16, 400)]
    rtt = {"boast": 5.0, "honest": 5.0}
    assert plan(find_route(peers, 0, 16, costs=RouteCosts(rtt_ms=rtt))) == [("boast", 0, 16)]
    measured = RouteCosts(rtt_ms=rtt, compute_scale={"boast": 10.0})
    assert plan(find_route(peers, 0, 16, costs=measured)) == [("honest", 0, 16)]


def test_long_prefills_weigh_prefill_throughput() -> None:
    # Same decode speed; "batcher" prefills 20x faster. A 2,000-token prompt for 10 new tokens is
    # dominated by the prefill, so it goes to the batcher; a short chat does not care.
    peers = [peer("plain", 0, 16, 500, prefill=1000), peer("batcher", 0, 16, 450, prefill=20_000)]
    rtt = {"plain": 5.0, "batcher": 5.0}
    long_prompt = RouteCosts(rtt_ms=rtt, prefill_tokens=2000, decode_tokens=10)
    assert plan(find_route(peers, 0, 16, costs=long_prompt)) == [("batcher", 0, 16)]
    assert plan(find_route(peers, 0, 16, costs=RouteCosts(rtt_ms=rtt))) == [("plain", 0, 16)]


def test_forwarding_uses_the_peers_announced_pings() -> None:
    # The client reaches b1 and b2 equally well, but when a forwards to the next peer itself, its
    # announced round trips decide: 4 ms to b2 against 90 ms to b1.
    a = peer("a", 0, 8, 1000, pings={"b1": 90.0, "b2": 4.0})
    peers = [a, peer("b1", 8, 16, 1000), peer("b2", 8, 16, 1000)]
    rtt = {"a": 10.0, "b1": 10.0, "b2": 10.0}
    forwarding = RouteCosts(rtt_ms=rtt, forwarding=True)
    for seed in range(5):
        route = find_route(peers, 0, 16, costs=forwarding, rng=random.Random(seed))
        assert plan(route) == [("a", 0, 8), ("b2", 8, 16)]
    assert route_ms(route, peers, forwarding) == pytest.approx(5 + 8 + 2 + 8 + 5)
    # Relaying through the client, the peers' pings do not matter: either b is as good.
    relayed = Counter(plan(find_route(peers, 0, 16, costs=RouteCosts(rtt_ms=rtt), rng=random.Random(s)))[1][0]
                      for s in range(40))
    assert set(relayed) == {"b1", "b2"}


def test_slack_spreads_sessions_over_nearly_equal_peers() -> None:
    peers = [peer("x", 0, 16, 1000), peer("y", 0, 16, 960), peer("slow", 0, 16, 300)]
    rtt = {"x": 5.0, "y": 5.0, "slow": 5.0}
    rng = random.Random(3)
    tight = Counter(find_route(peers, 0, 16, costs=RouteCosts(rtt_ms=rtt), rng=rng)[0].peer.peer_id for _ in range(50))
    assert tight == {"x": 50}  # latency-bound: the fastest, every time
    spread = Counter(find_route(peers, 0, 16, costs=RouteCosts(rtt_ms=rtt, slack=0.1), rng=rng)[0].peer.peer_id
                     for _ in range(400))
    assert set(spread) == {"x", "y"} and min(spread.values()) > 120, spread  # never the slow one


def brute_force_ms(peers: list[PeerRecord], start: int, end: int, costs: RouteCosts) -> float:
    """Dijkstra over (boundary, last peer) trying every hop (peer, from, to): the reference.

    A prefix's cost is ``route_ms`` without the final trip back to the client (which only the last
    hop pays), so it only grows as hops are added.
    """

    def back_ms(route: tuple[Hop, ...]) -> float:
        rtt = max(costs.rtt_ms.get(route[-1].peer.peer_id, costs.default_rtt_ms), 0.01)
        return rtt / 2 if costs.forwarding else 0.0

    settled: dict[tuple[int, str], float] = {}
    queue: list[tuple[float, int, tuple[Hop, ...]]] = [(0.0, start, ())]
    finished = []
    while queue:
        cost, boundary, hops = heapq.heappop(queue)
        if boundary == end:
            finished.append(cost + back_ms(hops))
            continue
        for candidate in peers:
            if not candidate.start_layer <= boundary < candidate.end_layer:
                continue
            for stop in range(boundary + 1, min(candidate.end_layer, end) + 1):
                route = (*hops, Hop(candidate, boundary, stop))
                total = route_ms(list(route), peers, costs) - back_ms(route)
                key = (stop, candidate.peer_id)
                if total < settled.get(key, float("inf")) - 1e-12:
                    settled[key] = total
                    heapq.heappush(queue, (total, stop, route))
    return min(finished)


@pytest.mark.parametrize("forwarding", [False, True])
def test_matches_a_brute_force_search_on_random_swarms(forwarding: bool) -> None:
    rng = random.Random(11 + forwarding)
    layers = 10
    compared = 0
    for _ in range(80):
        count = rng.randint(2, 7)
        names = [f"p{i}" for i in range(count)]
        peers = []
        for name in names:
            length = rng.randint(1, layers)
            start = rng.randint(0, layers - length)
            others = rng.sample(names, rng.randint(0, count - 1))
            pings = {other: rng.uniform(1, 80) for other in others if other != name}
            peers.append(peer(name, start, start + length, rng.uniform(20, 2000), free=rng.choice([0, 5000]),
                              pings=pings, prefill=rng.choice([0.0, rng.uniform(500, 9000)]), layers=layers))
        if any(not any(p.start_layer <= layer < p.end_layer for p in peers) for layer in range(layers)):
            continue
        costs = RouteCosts(
            rtt_ms={name: rng.uniform(0.5, 60) for name in names if rng.random() < 0.8},
            compute_scale={name: rng.uniform(0.5, 3) for name in names if rng.random() < 0.3},
            prefill_tokens=rng.choice([0, 300]), decode_tokens=rng.choice([1, 20]), cache_tokens=1000,
            forwarding=forwarding,
        )
        a, b = sorted(rng.sample(range(layers + 1), 2))
        if a == b:
            continue
        route = find_route(peers, a, b, costs=costs, rng=rng)
        assert route[0].start == a and route[-1].end == b
        assert all(x.end == y.start for x, y in itertools.pairwise(route))
        assert route_ms(route, peers, costs) == pytest.approx(brute_force_ms(peers, a, b, costs), rel=1e-9)
        compared += 1
    assert compared >= 30
