"""Aggregate decode throughput of a 2-peer swarm as concurrent sessions grow: 1, 4, 16, 64.

    python benchmarks/throughput.py                 # ~250M Llama shape (hidden 1024, 16 layers)
    python benchmarks/throughput.py --small         # a quick run on a tiny shape
    python benchmarks/throughput.py --sessions 1 16 --steps 16

Each session is a real ``InferenceSession`` with its own cache on both peers (one client identity,
so the peers are started with a per-client share of the whole pool). The client drives every
session's decode steps at once, as a serving front end would: all sessions' steps go out
together, and the LM head of all sessions runs as one batched matmul on the client. What the
figure measures is therefore the peers' continuous batching: N sessions' steps arriving within the
batch window run as one pass over the span.

Printed per N: aggregate tokens/s over the decode steps (prefill excluded), per-session ms/token,
the ratio to 1 session, the compute passes the peers ran per step (1.0 = every step batched), and
whether session 0 (the same prompt in every round) chose the same tokens as it did alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `brigade` entry point sets it

import torch
from decode_latency import SHAPES, build_checkpoint

from brigade.client import DistributedModelForCausalLM
from brigade.client.session import InferenceSession
from brigade.demo import split_layers
from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb


@dataclass
class Round:
    sessions: int
    seconds: float
    steps: int
    passes_per_step: float
    first_tokens: list[int]
    compute_ms: float  # the peers' compute per step, all hops together

    @property
    def tokens_per_s(self) -> float:
        return self.sessions * self.steps / self.seconds

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / self.steps


async def peer_counters(model: DistributedModelForCausalLM, peers: list) -> tuple[int, float]:
    """Compute passes the peers have run so far, and the seconds they spent in them (Info RPC)."""
    passes, seconds = 0, 0.0
    for record in peers:
        info = await model.swarm.stub(record).Info(pb.InfoRequest(), timeout=10)
        passes += info.compute_passes
        seconds += info.compute_seconds
    return passes, seconds


async def run_round(model: DistributedModelForCausalLM, prompts: torch.Tensor, steps: int) -> Round:
    """Opens one session per prompt row, prefills them all, then times ``steps`` lockstep decode steps."""
    count, length = prompts.shape
    sessions = [InferenceSession(model.swarm, model.standing, 1, length + steps + 1, [0]) for _ in range(count)]
    await asyncio.gather(*(session.open() for session in sessions))
    try:
        records = {stream.hop.peer.peer_id: stream.hop.peer for session in sessions for stream in session.hops}
        hidden = model.head.embed(prompts)
        outputs = await asyncio.gather(*(s.step(hidden[i : i + 1]) for i, s in enumerate(sessions)))
        tokens = model.head.logits(torch.cat([out[:, -1] for out in outputs])).argmax(-1)
        chosen = [tokens]
        passes_before, compute_before = await peer_counters(model, list(records.values()))
        began = time.perf_counter()
        for _ in range(steps):
            hidden = model.head.embed(tokens[:, None])
            outputs = await asyncio.gather(*(s.step(hidden[i : i + 1]) for i, s in enumerate(sessions)))
            tokens = model.head.logits(torch.cat([out[:, -1] for out in outputs])).argmax(-1)
            chosen.append(tokens)
        seconds = time.perf_counter() - began
        passes, compute = await peer_counters(model, list(records.values()))
        passes, compute = passes - passes_before, compute - compute_before
        hops = len(sessions[0].hops)
    finally:
        await asyncio.gather(*(session.close() for session in sessions), return_exceptions=True)
    return Round(count, seconds, steps, passes / steps / hops, [int(step[0]) for step in chosen],
                 1000 * compute / steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shape for a quick check")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per session")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=None, help="peers' --batch-window-ms")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="peers in batch-invariant mode (one step per pass: what the mode costs)")
    args = parser.parse_args()
    shape = SHAPES["small" if args.small else "250m"]
    most = max(args.sessions)
    cache_tokens = most * (args.prompt_tokens + args.steps + 64) * 2  # room for page rounding
    peer_args = ["--drain-grace", "1", "--cache-tokens", str(cache_tokens), "--client-cache-share", "1.0",
                 "--max-sessions-per-client", str(2 * most)]
    if args.batch_window_ms is not None:
        peer_args += ["--batch-window-ms", str(args.batch_window_ms)]
    if args.batch_invariant:
        peer_args += ["--batch-invariant"]

    with tempfile.TemporaryDirectory(prefix="brigade-bench-") as tmp:
        checkpoint = Path(tmp) / "llama-bench"
        build_checkpoint(checkpoint, shape)
        generator = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, shape["vocab_size"], (most, args.prompt_tokens), generator=generator)
        with LocalSwarm(Path(tmp) / "swarm") as swarm:
            swarm.start_bootstrap()
            launched = [swarm.add_peer(str(checkpoint), span, wait=False, extra_args=peer_args)
                        for span in split_layers(shape["num_hidden_layers"], 2)]
            for peer in launched:
                swarm.wait_ready(peer)
            with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
                model._loop.run(run_round(model, prompts[:2], 4), 300)  # warm-up: connections, allocator
                rounds = []
                for count in args.sessions:
                    rounds.append(model._loop.run(run_round(model, prompts[:count], args.steps), 1800))
                    print(f"  {count} sessions: {rounds[-1].tokens_per_s:.1f} tokens/s", flush=True)
    single = next((r for r in rounds if r.sessions == 1), rounds[0])
    print(f"\n{'sessions':>8}{'tokens/s':>10}{'ms/token':>10}{'vs 1':>7}{'passes/step':>13}"
          f"{'peer compute ms':>17}  session 0 same")
    for r in rounds:
        same = "yes" if r.first_tokens == single.first_tokens else "NO"
        print(f"{r.sessions:>8}{r.tokens_per_s:>10.1f}{r.ms_per_token:>10.1f}"
              f"{r.tokens_per_s / single.tokens_per_s:>7.2f}{r.passes_per_step:>13.2f}{r.compute_ms:>17.1f}  {same}")
    print(f"({args.steps} greedy decode steps per session after a {args.prompt_tokens}-token prompt, 2 peers, "
          f"{os.cpu_count()} cores, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
