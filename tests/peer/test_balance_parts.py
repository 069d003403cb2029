"""The peer's balance parts without a network: throughput cache, next-hop targets, the re-check
loop's safeguards, the mover's order of steps, and the client's latency book."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from brigade.peer.mover import SpanMover, Unloaded
from brigade.peer.pings import NextHopPings, next_hop_targets
from brigade.peer.rebalancer import Rebalancer
from brigade.peer.throughput import Throughput, ThroughputCache, parse_throughput_option
from brigade.protocol.errors import PeerLeavingError
from brigade.protocol.records import MAX_PINGS, PeerRecord
from brigade.routing.latency import LatencyBook


def record(name: str, start: int, end: int, *, state: str = "online", throughput: float = 100.0,
           layers: int = 6) -> PeerRecord:
    return PeerRecord(peer_id=name, public_key="00" * 32, address=f"{name}:1", model_name="m", start_layer=start,
                      end_layer=end, num_layers=layers, dtype="float32", state=state, throughput=throughput,
                      signed_at=1.0)


# -- throughput cache ---------------------------------------------------------------------------
def test_cache_round_trip_bound_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "throughput.json"
    cache = ThroughputCache(path, max_entries=3)
    assert cache.get("a") is None  # no file yet
    for index in range(5):
        cache.put(f"k{index}", Throughput(100.0 + index, 900.0))
    data = json.loads(path.read_text())
    assert sorted(data["entries"]) == ["k2", "k3", "k4"]  # bounded, oldest dropped
    assert cache.get("k4") == Throughput(104.0, 900.0)

    path.write_text("{not json")  # a torn or foreign file: ignored, then rewritten
    assert cache.get("k4") is None
    cache.put("k5", Throughput(5.0, 0.0))
    assert cache.get("k5") == Throughput(5.0, 0.0)
    path.write_text(json.dumps({"format": 1, "entries": {"bad": {"decode": "fast"}, "neg": {"decode": -1,
                                                                                             "prefill": 0}}}))
    assert cache.get("bad") is None and cache.get("neg") is None
    path.write_bytes(b"x" * (2 << 20))  # too big to be ours
    assert cache.get("k5") is None
    assert not list(tmp_path.glob("sub/.throughput-*"))  # no temporary files left behind


def test_throughput_option() -> None:
    assert parse_throughput_option("auto") == "auto"
    assert parse_throughput_option("250") == Throughput(250.0, 0.0)
    assert parse_throughput_option("250:4000") == Throughput(250.0, 4000.0)
    for bad in ("fast", "-3", "0", "1:2:3", "nan"):
        with pytest.raises(ValueError):
            parse_throughput_option(bad)


# -- next-hop pings -----------------------------------------------------------------------------
def test_next_hop_targets_are_the_peers_of_the_next_layer() -> None:
    records = [record("me", 0, 3), record("a", 3, 6), record("b", 2, 5), record("c", 4, 6), record("d", 3, 6,
               state="leaving"), record("e", 0, 3)]
    names = {r.peer_id for r in next_hop_targets(records, "me", 3, set(), random.Random(0))}
    assert names == {"a", "b"}  # hold layer 3; not c (starts after), not d (leaving), not me
    crowd = [record(f"p{i}", 3, 6) for i in range(20)]
    chosen = next_hop_targets(crowd, "me", 3, {"p7", "p9"}, random.Random(1))
    assert len(chosen) == MAX_PINGS and {"p7", "p9"} <= {r.peer_id for r in chosen}  # measured ones kept


def test_pings_replace_the_set_and_smooth() -> None:
    swarm = [record("a", 3, 6), record("b", 3, 6)]
    answers = {"a": [10.0, 30.0], "b": [None, 5.0]}

    async def measure(target: PeerRecord, timeout_s: float) -> float | None:
        return answers[target.peer_id].pop(0)

    async def read() -> list[PeerRecord]:
        return swarm

    async def scenario() -> None:
        pings = NextHopPings("me", lambda: 3, read, measure=measure)
        assert await pings.ping_once() == {"a": 10.0}  # b did not answer: left out
        assert await pings.ping_once() == {"a": 20.0, "b": 5.0}  # a smoothed 10 -> 30

    asyncio.run(scenario())


# -- the re-check loop --------------------------------------------------------------------------
class FakeSwarm:
    def __init__(self, records: list[PeerRecord]):
        self.records = records
        self.moves: list[tuple[int, int]] = []

    async def read(self) -> list[PeerRecord]:
        return self.records

    async def move(self, start: int, end: int) -> bool:
        self.moves.append((start, end))
        self.records = [r.model_copy(update={"start_layer": start, "end_layer": end}) if r.peer_id == "me" else r
                        for r in self.records]
        return True


def rebalancer(swarm: FakeSwarm, **options: object) -> Rebalancer:
    def span() -> tuple[int, int]:
        mine = next(r for r in swarm.records if r.peer_id == "me")
        return mine.start_layer, mine.end_layer

    return Rebalancer("me", 6, span, swarm.read, swarm.move, **options)  # type: ignore[arg-type]


def test_the_elected_peer_fills_a_gap_and_then_rests() -> None:
    # "me" doubles "a" on 0:3 while 3:6 has nobody: the election picks a peer of 0:3 to move.
    swarm = FakeSwarm([record("a", 0, 3), record("me", 0, 3)])
    loop = rebalancer(swarm, cooldown_checks=2)

    async def scenario() -> None:
        # "a" has the smaller id, so it is elected first; it never moves (say its span is fixed).
        for _ in range(3):
            assert await loop.check_once() is None
        move = await loop.check_once()  # patience: "a" was elected 3 times in vain, now "me" gets its turn
        assert move is not None and move.new == (3, 6) and swarm.moves == [(3, 6)]
        assert await loop.check_once() is None and await loop.check_once() is None  # cooldown
        assert await loop.check_once() is None and swarm.moves == [(3, 6)]  # balanced now

    asyncio.run(scenario())


def test_no_decision_while_a_peer_leaves_or_before_its_own_record_shows() -> None:
    swarm = FakeSwarm([record("me", 0, 3), record("z", 0, 3), record("b", 3, 6, state="leaving")])
    loop = rebalancer(swarm)
    asyncio.run(loop.check_once())
    assert swarm.moves == []
    swarm.records = [record("z", 0, 3)]  # our own record has not reached the DHT yet
    asyncio.run(loop.check_once())
    assert swarm.moves == []


# -- the mover ----------------------------------------------------------------------------------
class FakeSessions:
    def __init__(self) -> None:
        self.accepting = True
        self.sessions: dict[str, object] = {"s1": object()}
        self.closed: list[str] = []

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self.closed.append(session_id)


def test_mover_drains_then_reloads_then_announces() -> None:
    sessions = FakeSessions()
    steps: list[str] = []
    span = {"now": (0, 3)}

    async def announce(state: str) -> bool:
        steps.append(f"announce {state} accepting={sessions.accepting}")
        return True

    async def load(start: int, end: int) -> str:
        steps.append(f"load {start}:{end}")
        if (start, end) == (1, 4):
            raise RuntimeError("disk full")
        return f"span {start}:{end}"

    async def unload() -> None:
        steps.append("unload")

    async def install(loaded: str, start: int, end: int) -> None:
        steps.append(f"install {loaded}")
        span["now"] = (start, end)

    mover = SpanMover(sessions, announce, lambda: span["now"], load, unload, install, drain_s=0.3, min_leaving_s=0.1)
    assert asyncio.run(mover.move(3, 6)) is True
    assert steps == ["announce leaving accepting=False", "unload", "load 3:6", "install span 3:6",
                     "announce online accepting=True"]
    assert sessions.closed == ["s1"]  # still open after the drain: closed (its client migrates)
    steps.clear()
    assert asyncio.run(mover.move(1, 4)) is False  # the new span fails to load: back to the old one
    assert steps[-3:] == ["load 3:6", "install span 3:6", "announce online accepting=True"]
    assert span["now"] == (3, 6) and sessions.accepting


def test_unloaded_span_refuses_as_leaving() -> None:
    with pytest.raises(PeerLeavingError):
        Unloaded()(None)


# -- the client's latency book ------------------------------------------------------------------
def test_latency_book_learns_network_and_compute() -> None:
    book = LatencyBook(max_peers=2, smoothing=0.5)
    peer = record("p", 0, 6, throughput=1000.0)  # announces 1 ms a layer
    book.observe_rtt("p", 10.0)
    book.observe_step(peer, 6, elapsed_ms=10.0 + 60.0, compute_ms=60.0)  # really 10 ms a layer: 10x slower
    assert book.rtt_ms("p") == pytest.approx(10.0)
    assert book.compute_scale("p") == pytest.approx(10.0)
    book.observe_step(peer, 6, elapsed_ms=10.0 + 6.0, compute_ms=6.0)  # back to what it announces
    assert book.compute_scale("p") == pytest.approx(0.5 * 1.0 + 0.5 * 10.0)
    costs = book.costs()
    assert costs.rtt_ms == {"p": 10.0} and costs.compute_scale["p"] > 1
    book.observe_rtt("q", 1.0)
    book.observe_rtt("r", 1.0)
    assert not book.knows("p") and book.knows("r")  # bounded: the least recent is forgotten
