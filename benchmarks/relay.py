"""What a relay costs: ms/token through a relayed hop against a direct hop, on loopback and on the testbed.

    python benchmarks/relay.py                          # loopback, then the testbed's internet profile (root)
    python benchmarks/relay.py --where loopback --rounds 5 --new-tokens 64
    sudo python benchmarks/relay.py --where testbed --profile internet

Loopback: one swarm, an 8-layer Llama-shaped checkpoint built here from a fixed seed (the shape of
benchmarks/wan.py). Peer A serves layers 0:4; E serves 0:2 and relays (a two-hop start through E
costs more than A alone, so routes start at A); D and R both serve 4:8, D directly and R always
through E's relay (``--reachability relayed``). Two clients generate the same greedy tokens, one
kept off R and one kept off D, alternating for ``--rounds`` rounds; it prints the median ms/token
of decode steps after the first token, and the median unary ``Info`` round trip to D and to R
(the transport cost alone).

Testbed: two runs on the same links (same seed, so the same round trips): p0 serves 0:4, p2
serves 0:2 and relays, p1 serves 4:8, first on the bridge (direct), then behind a home router
(NAT, relayed through p2). A relayed hop's traffic crosses the relay's link twice each way (in and
out) on top of the home's link, so its floor is higher by two of the relay's round trips.

Starts DHT nodes and peer processes: take the shared swarm lock on a shared machine
(``flock /tmp/brigade-swarm.lock python benchmarks/relay.py``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `brigade` entry point sets it
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no fork() notices when the testbed starts processes

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024, initializer_range=0.25)
PROMPT = [11, 42, 7, 1999, 305, 64, 2048, 3, 90, 17, 511, 8]
PEER_ARGS = ["--announce-period", "2", "--record-ttl", "6", "--drain-grace", "1", "--ping-period", "0",
             "--rebalance-period", "0"]


def build_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).eval().save_pretrained(folder)
    return folder


def step_ms(model: DistributedModelForCausalLM, new_tokens: int) -> tuple[list[float], list[int]]:
    """Decode step times (ms, after the first token) and the tokens of one greedy generation."""
    times, tokens = [], []
    for step in model.stream(torch.tensor([PROMPT]), max_new_tokens=new_tokens, do_sample=False):
        times.append(time.perf_counter())
        tokens.append(int(step[0]))
    return [1000 * (b - a) for a, b in itertools.pairwise(times)], tokens


def info_ms(model: DistributedModelForCausalLM, peer_id: str, count: int = 50) -> float:
    async def measure() -> float:
        records = {record.peer_id: record for record in await model.swarm.records(0.0)}
        stub = model.swarm.stub(records[peer_id])
        await stub.Info(pb.InfoRequest(), timeout=10)
        samples = []
        for _ in range(count):
            began = time.perf_counter()
            await stub.Info(pb.InfoRequest(), timeout=10)
            samples.append((time.perf_counter() - began) * 1000)
        return statistics.median(samples)

    return model._loop.run(measure(), 60)


def loopback(checkpoint: Path, folder: Path, rounds: int, new_tokens: int, threads: int) -> None:
    swarm = LocalSwarm(folder / "loopback", peer_threads=threads)
    try:
        swarm.start_bootstrap()
        swarm.add_peer(str(checkpoint), (0, 4), extra_args=PEER_ARGS, wait=False)
        relay = swarm.add_peer(str(checkpoint), (0, 2), extra_args=[*PEER_ARGS, "--relay"])
        direct = swarm.add_peer(str(checkpoint), (4, 8), extra_args=PEER_ARGS, wait=False)
        relayed = swarm.add_peer(str(checkpoint), (4, 8), extra_args=[*PEER_ARGS, "--reachability", "relayed"],
                                 wait=False)
        for peer in swarm.peers:
            swarm.wait_ready(peer)
        ids = {name: str(peer.info["peer_id"]) for name, peer in
               (("relay", relay), ("direct", direct), ("relayed", relayed))}
        clients = {
            "direct": DistributedModelForCausalLM.from_pretrained(
                str(checkpoint), swarm.initial_peers, blocked_peers=frozenset({ids["relayed"]})),
            "relayed": DistributedModelForCausalLM.from_pretrained(
                str(checkpoint), swarm.initial_peers, blocked_peers=frozenset({ids["direct"]})),
        }
        try:
            steps: dict[str, list[float]] = {name: [] for name in clients}
            tokens: dict[str, list[int]] = {}
            for model in clients.values():  # warm up: connections, pings, caches
                step_ms(model, 4)
            for _ in range(rounds):
                for name, model in clients.items():
                    times, tokens[name] = step_ms(model, new_tokens)
                    steps[name].append(statistics.median(times))
                    expected = ids[name]
                    assert model.last_route[-1].startswith(expected), (name, model.last_route)
            info = {name: info_ms(model, ids[name]) for name, model in clients.items()}
        finally:
            for model in clients.values():
                model.close()
    finally:
        swarm.close()
    direct_ms = statistics.median(steps["direct"])
    print(f"\nloopback: A[0:4] -> D[4:8] direct, or -> R[4:8] through E's relay "
          f"({new_tokens} greedy tokens, median of {rounds} rounds)")
    print(f"{'hop 4:8':<14} {'ms/token':>9} {'vs direct':>10} {'Info rtt ms':>12}  same tokens")
    for name in ("direct", "relayed"):
        value = statistics.median(steps[name])
        print(f"{name:<14} {value:>9.2f} {value / direct_ms:>10.2f} {info[name]:>12.2f}  "
              f"{'yes' if tokens[name] == tokens['direct'] else 'NO'}")
    print(f"a relayed hop adds {statistics.median(steps['relayed']) - direct_ms:.2f} ms per token here "
          f"(rounds: direct {', '.join(f'{v:.2f}' for v in steps['direct'])}; "
          f"relayed {', '.join(f'{v:.2f}' for v in steps['relayed'])})")


def testbed(checkpoint: Path, folder: Path, profile: str, seed: int, new_tokens: int) -> None:
    from brigade.deploy.testbed import Testbed, TestbedConfig, namespaces_available
    from brigade.deploy.testbed.homes import nat_available

    reason = namespaces_available() or nat_available()
    if reason:
        print(f"\ntestbed skipped: {reason}")
        return
    rows = []
    for name, homes in (("direct", ()), ("relayed", (1,))):
        config = TestbedConfig(model=str(checkpoint), spans=((0, 4), (4, 8), (0, 2)), profile=profile, seed=seed,
                               relays=(2,), home_peers=homes, peer_args=tuple(PEER_ARGS),
                               log_dir=str(folder / f"testbed-{name}"))
        with Testbed(config) as started:
            started.generate(prompt_ids=PROMPT, new_tokens=4)  # warm up
            result = started.generate(prompt_ids=PROMPT, new_tokens=new_tokens)
            rtts = [host.rtt_ms for host in result.hops]
            relay_rtt = started.peers[2].host.rtt_ms
        rows.append((name, result, rtts, relay_rtt))
    direct_ms = statistics.median(rows[0][1].step_ms)
    print(f"\ntestbed, {profile} profile (seed {seed}): p0[0:4] -> p1[4:8] on the bridge, then behind NAT "
          f"relayed by p2 ({new_tokens} greedy tokens per run)")
    print(f"{'hop 4:8':<10} {'ms/token':>9} {'median':>8} {'vs direct':>10} {'link rtts ms':>16}  same tokens")
    for name, result, rtts, relay_rtt in rows:
        median = statistics.median(result.step_ms)
        links = "+".join(f"{rtt:g}" for rtt in rtts) + (f" (+relay {relay_rtt:g} x2)" if name == "relayed" else "")
        print(f"{name:<10} {result.ms_per_token:>9.1f} {median:>8.1f} {median / direct_ms:>10.2f} {links:>16}  "
              f"{'yes' if result.tokens == rows[0][1].tokens else 'NO'}   route {result.describe_route()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--where", default="loopback,testbed", help="loopback, testbed or both (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5, help="loopback rounds (alternating direct and relayed)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    parser.add_argument("--profile", default="internet", help="testbed link profile")
    parser.add_argument("--seed", type=int, default=0, help="draws the testbed's round trips")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    where = {item.strip() for item in options.where.split(",") if item.strip()}
    if not where <= {"loopback", "testbed"}:
        sys.exit("--where takes loopback, testbed or both")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="brigade-relay-bench-") as name:
        folder = Path(name)
        checkpoint = build_checkpoint(folder / "llama-8l")
        if "loopback" in where:
            loopback(checkpoint, folder, options.rounds, options.new_tokens, options.threads)
        if "testbed" in where:
            testbed(checkpoint, folder, options.profile, options.seed, options.new_tokens)
    print(f"\n(8-layer Llama, hidden {SHAPE['hidden_size']}, fp32 CPU, {options.threads} torch thread(s) per peer, "
          f"torch {torch.__version__}; {time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
