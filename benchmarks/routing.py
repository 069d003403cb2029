"""How long route finding, span choice and the rebalancing election take on big simulated swarms.

    python benchmarks/routing.py [--rounds 20]

Swarms of 100, 1,000 and 10,000 peers serve an 80-layer model (Llama-3-70B). Each peer holds a
random span of 1 to 40 layers, announces a decode and prefill throughput drawn over two orders of
magnitude, free cache (10% are full) and round trips to up to 8 peers after its span; the client
has measured its own round trip to 70% of them. Timings are medians over ``--rounds`` calls of
the pure functions, records already parsed (what a client does per session or failover):

- ``find_route`` for a decode session (the client relays every hop), for a long-prompt session
  with 20% slack (throughput-bound: spread over near-equal peers), and with peer-to-peer
  forwarding (the peers' announced pings decide);
- ``choose_span`` for a joining peer, and ``plan_move`` (one rebalancing re-check: every peer's
  best move, then the election).

The target is under 50 ms per route at 1,000 peers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from brigade.protocol.records import PeerRecord
from brigade.routing.rebalance import plan_move
from brigade.routing.route import RouteCosts, find_route
from brigade.routing.snapshot import SwarmSnapshot
from brigade.routing.span_choice import choose_span

LAYERS = 80
SIZES = (100, 1_000, 10_000)


def make_swarm(count: int, rng: random.Random) -> tuple[list[PeerRecord], dict[str, float]]:
    records = []
    for index in range(count):
        length = rng.randint(1, 40)
        start = rng.randint(0, LAYERS - length)
        throughput = 10 ** rng.uniform(1, 3)
        records.append(PeerRecord(
            peer_id=f"peer{index}", public_key="00" * 32, address=f"10.0.{index // 250}.{index % 250}:31337",
            model_name="bench/llama-3-70b", start_layer=start, end_layer=start + length, num_layers=LAYERS,
            dtype="bfloat16", quantization="nf4", throughput=throughput,
            prefill_throughput=throughput * rng.uniform(5, 40),
            free_cache_tokens=0 if rng.random() < 0.1 else rng.randint(1_000, 100_000), signed_at=1.0,
        ))
    by_layer: dict[int, list[str]] = {}
    for record in records:
        by_layer.setdefault(record.start_layer, []).append(record.peer_id)
    with_pings = []
    for record in records:
        after = by_layer.get(record.end_layer, []) or [r.peer_id for r in rng.sample(records, 8)]
        pings = {peer_id: rng.uniform(2, 150) for peer_id in rng.sample(after, min(8, len(after)))}
        with_pings.append(record.model_copy(update={"pings": pings}))
    rtt = {record.peer_id: rng.uniform(2, 150) for record in records if rng.random() < 0.7}
    return with_pings, rtt


def median_ms(call: Callable[[], object], rounds: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def bench(count: int, rng: random.Random, rounds: int) -> list[float]:
    """The five timings (ms) for one swarm size."""
    records, rtt = make_swarm(count, rng)
    decode = RouteCosts(rtt_ms=rtt, cache_tokens=4096)
    prompt = RouteCosts(rtt_ms=rtt, cache_tokens=4096, prefill_tokens=4000, decode_tokens=50, slack=0.2)
    forwarding = RouteCosts(rtt_ms=rtt, cache_tokens=4096, forwarding=True)
    snapshot = SwarmSnapshot.from_records(records, LAYERS)
    cells = [median_ms(lambda costs=costs: find_route(records, 0, LAYERS, costs=costs, rng=rng), rounds)
             for costs in (decode, prompt, forwarding)]
    cells.append(median_ms(lambda: choose_span(records, LAYERS, 20, throughput=300.0), rounds))
    cells.append(median_ms(lambda: plan_move(snapshot), rounds if count < 10_000 else max(3, rounds // 4)))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    widths = (14, 12, 11, 12, 10)
    print(f"{'peers':>7}  {'route: decode':>14}  {'long prompt':>12}  {'forwarding':>11}  {'choose_span':>12}  "
          f"{'plan_move':>10}   (ms, median of {options.rounds})")
    for count in SIZES:
        cells = bench(count, rng, options.rounds)
        print(f"{count:>7}  " + "  ".join(f"{cell:>{width}.1f}" for cell, width in zip(cells, widths, strict=True)))
    print("(one thread, records already parsed; target: a route under 50 ms at 1,000 peers)")


if __name__ == "__main__":
    main()
