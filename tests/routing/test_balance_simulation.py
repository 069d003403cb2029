"""A swarm of 200 heterogeneous peers joins one by one, then 30% leave: it stays covered, near the
best possible weakest layer, and calm. Pure: no network, only the span choice and rebalancing
functions over snapshots, with an LP/MILP solver for the best possible value.

Peers are drawn from a spread of volunteer hardware hosting Llama-3-70B (80 layers): laptops and
desktops on CPU, 8 to 24 GB consumer GPUs, 48 GB workstation and 80 GB datacenter GPUs, mostly at
nf4, some at int8 or bf16. A peer hosts as many layers as fit in 75% of its memory (the rest is
KV cache, as the planner keeps) and decodes at a speed set by its memory bandwidth and bytes per
layer, with +-25% noise. After each join or leave, time passes: the swarm makes the moves its
peers' periodic re-checks would make (one elected move at a time, each on a fresh snapshot)
until none is left, and then it is checked.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from brigade_lp import certify

from brigade.routing.rebalance import (
    DEFAULT_MIN_GAIN,
    REPLAN_MAX_PEERS,
    balance_of,
    best_start,
    move_bound,
    plan_move,
)
from brigade.routing.snapshot import PeerSpan, SwarmSnapshot

LAYERS = 80  # Llama-3-70B
GIB = 1 << 30
LAYER_BYTES = {"nf4": 0.459 * GIB, "int8": 0.816 * GIB, "bfloat16": 1.6 * GIB}  # benchmarks/memory.py
# (kind, memory GiB, memory bandwidth GB/s, share of volunteers)
HARDWARE = [
    ("cpu", 16, 50, 0.12),
    ("gpu-8g", 8, 448, 0.18),
    ("gpu-12g", 12, 360, 0.15),
    ("gpu-16g", 16, 320, 0.10),
    ("gpu-24g", 24, 936, 0.25),
    ("gpu-48g", 48, 768, 0.10),
    ("gpu-80g", 80, 2000, 0.10),
]
QUANTIZATIONS = [("nf4", 0.7), ("int8", 0.15), ("bfloat16", 0.15)]
MIN_RATIO = 0.8


def draw_peer(rng: random.Random, index: int) -> tuple[str, int, float]:
    """(peer id, layers that fit, tokens/s per layer) of one volunteer."""
    _, memory, bandwidth, _ = rng.choices(HARDWARE, weights=[h[3] for h in HARDWARE])[0]
    quantization = rng.choices([q for q, _ in QUANTIZATIONS], weights=[w for _, w in QUANTIZATIONS])[0]
    usable = (memory - 1.0) * GIB * 0.75  # 1 GiB for the runtime, 25% for the KV cache
    if usable < LAYER_BYTES[quantization]:
        quantization = "nf4"
    fits = max(1, min(LAYERS, int(usable // LAYER_BYTES[quantization])))
    efficiency = 0.35 if quantization == "nf4" else 0.6  # dequantizing kernels reach less of the bandwidth
    throughput = efficiency * bandwidth * 1e9 / LAYER_BYTES[quantization] * math.exp(rng.gauss(0, 0.25))
    return f"peer{index:03d}", fits, throughput


@dataclass
class Run:
    snapshot: SwarmSnapshot = field(default_factory=lambda: SwarmSnapshot(LAYERS))
    moves: int = 0
    bound_total: int = 0
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # each peer's spans, in order
    most_in_one_event: int = 0
    ratios: list[tuple[str, float, str]] = field(default_factory=list)  # (event, ratio, bound method)
    failures: list[str] = field(default_factory=list)

    def settle(self, event: str) -> None:
        """The moves the peers' re-checks make before the next event, one elected move at a time."""
        # While membership stays the same: at most one re-plan transit (each peer moving once, swarms of
        # up to REPLAN_MAX_PEERS) plus the single moves move_bound allows.
        bound = move_bound(self.snapshot, min_gain=DEFAULT_MIN_GAIN)
        if len(self.snapshot.peers) <= REPLAN_MAX_PEERS:
            bound += len(self.snapshot.peers)
        made = 0
        seen = {self.snapshot}
        while (move := plan_move(self.snapshot)) is not None:
            peer = self.snapshot.get(move.peer_id)
            assert peer is not None
            covered = self.snapshot.layer_coverage() > 0
            self.snapshot = self.snapshot.with_peer(peer.moved_to(move.new[0]))
            assert (self.snapshot.layer_coverage()[covered] > 0).all(), f"{event}: {move} uncovered a layer"
            self.spans[move.peer_id].append(move.new)
            assert self.snapshot not in seen, f"{event}: the swarm came back to an earlier state"
            seen.add(self.snapshot)
            made += 1
            assert made <= bound, f"{event}: {made} moves, past the bound {bound}"
        self.moves += made
        self.bound_total += bound
        self.most_in_one_event = max(self.most_in_one_event, made)

    def check(self, event: str) -> None:
        snapshot = self.snapshot
        coverage = snapshot.layer_coverage()
        hosted = sum(peer.length for peer in snapshot.peers)
        if hosted >= LAYERS and (coverage == 0).any():
            self.failures.append(f"{event}: layers uncovered although {hosted} layers are hosted")
        if (coverage == 0).any():
            return  # nothing to compare: the model cannot run yet
        weakest = balance_of(snapshot).weakest
        certificate = certify(snapshot, weakest, MIN_RATIO)
        self.ratios.append((event, certificate.ratio(weakest), certificate.method))
        if not certificate.proven:
            self.failures.append(
                f"{event}: weakest layer {weakest:.1f} tokens/s, not proven within {MIN_RATIO:.0%} of the "
                f"best possible (bound {certificate.bound:.1f}, {certificate.method})"
            )


def test_two_hundred_peers_join_then_thirty_percent_leave() -> None:
    began = time.perf_counter()
    rng = random.Random(2024)
    run = Run()
    for index in range(200):
        peer_id, fits, throughput = draw_peer(rng, index)
        start = best_start(run.snapshot, fits, throughput)
        run.snapshot = run.snapshot.with_peer(PeerSpan(peer_id, start, start + fits, throughput))
        run.spans[peer_id] = [(start, start + fits)]
        run.settle(f"join {index}")
        run.check(f"join {index}")
    joined_moves = run.moves
    leaving = [peer.peer_id for peer in run.snapshot.peers]
    rng.shuffle(leaving)
    for peer_id in leaving[:60]:
        run.snapshot = run.snapshot.without(peer_id)
        run.settle(f"leave {peer_id}")
        run.check(f"leave {peer_id}")

    ratios = [ratio for _, ratio, _ in run.ratios]
    worst = min(run.ratios, key=lambda item: item[1])
    methods = Counter(method for _, _, method in run.ratios)
    returned = sorted(peer_id for peer_id, spans in run.spans.items() if len(spans) != len(set(spans)))
    print(
        f"\n200 peers joined, 60 left: {len(run.ratios)} covered snapshots, each proven within {MIN_RATIO:.0%} of the "
        f"best possible weakest layer; weakest / upper bound: min {worst[1]:.3f} ({worst[0]}), median "
        f"{statistics.median(ratios):.3f}, final {ratios[-1]:.3f} (bounds: {dict(methods)})\n"
        f"moves: {joined_moves} while joining, {run.moves - joined_moves} while leaving, {run.moves} in all; "
        f"most after "
        f"one event {run.most_in_one_event} (sum of the per-event bounds {run.bound_total}); peers that ever moved "
        f"{sum(len(s) > 1 for s in run.spans.values())}, most moves of one peer "
        f"{max(len(s) - 1 for s in run.spans.values())}, peers back on a span held before a later join/leave: "
        f"{len(returned)}; {time.perf_counter() - began:.1f} s"
    )
    assert not run.failures, "\n".join(run.failures[:10])
    assert len(run.ratios) > 200
    assert run.moves <= 260 // 2, "more than one move per two joins or leaves"
    assert max(len(spans) - 1 for spans in run.spans.values()) <= 8
