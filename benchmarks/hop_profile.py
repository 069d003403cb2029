"""Where a decode step's time goes, hop by hop: round trip seen by the client vs compute on the peer.

    python benchmarks/hop_profile.py              # ~250M Llama shape, 4 peers
    python benchmarks/hop_profile.py --peers 2 --small

For each hop it prints the median client-side round trip of a one-position step, the compute time
the peer reports for it (StepResult.compute_ms), and the difference: what the hop costs beyond
compute (encoding, gRPC transport, the peer's queueing and checks). It also prints a unary Info
round trip as the transport floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `brigade` entry point sets it

import torch
from decode_latency import SHAPES, build_checkpoint

from brigade.client import DistributedModelForCausalLM
from brigade.client.session import InferenceSession
from brigade.demo import split_layers
from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.tensors import decode, encode


async def profile_steps(session: InferenceSession, hidden: torch.Tensor, steps: int) -> list[list[tuple[float, float]]]:
    """Per step, per hop: (round trip ms, peer compute ms), stepping each hop's stream by hand
    (client-driven hops: each answers the client, so each hop's share is visible)."""
    rows = []
    for _ in range(steps):
        row, current = [], hidden
        step_id = session.position + 1_000_000  # distinct from the session's own step ids
        for stream in session.hops:
            request = pb.InferenceRequest(session_id=stream.session_id, step=pb.Step(
                hidden=encode(current), start_position=session.position, step_id=step_id, step_positions=1))
            began = time.perf_counter()
            await stream.send(request)
            response = await stream.answer(10.0)
            row.append(((time.perf_counter() - began) * 1000, response.result.compute_ms))
            current = decode(response.result.hidden)
        session.position += 1
        rows.append(row)
    return rows


async def info_round_trip(model: DistributedModelForCausalLM, record: Any, count: int) -> float:
    stub = model.swarm.stub(record)
    times = []
    for _ in range(count):
        began = time.perf_counter()
        await stub.Info(pb.InfoRequest(), timeout=10)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    shape = SHAPES["small" if args.small else "250m"]
    with tempfile.TemporaryDirectory(prefix="brigade-hops-") as tmp:
        checkpoint = Path(tmp) / "llama-hops"
        build_checkpoint(checkpoint, shape)
        with LocalSwarm(Path(tmp) / "swarm") as swarm:
            swarm.start_bootstrap()
            for span in split_layers(shape["num_hidden_layers"], args.peers):
                swarm.add_peer(str(checkpoint), span, wait=False, extra_args=["--drain-grace", "1"])
            for peer in swarm.peers:
                swarm.wait_ready(peer)
            with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers,
                                                             forwarding=False) as model:
                session = InferenceSession(model.swarm, model.standing, 1, args.steps + 16, [0])
                model._loop.run(session.open())
                hidden = torch.randn(1, 1, shape["hidden_size"])
                model._loop.run(profile_steps(session, hidden, 5))  # warm-up
                rows = model._loop.run(profile_steps(session, hidden, args.steps))
                floor = model._loop.run(info_round_trip(model, session.hops[0].hop.peer, 50))
                model._loop.run(session.close())
    print(f"\n{'hop':<6}{'round trip ms':>15}{'peer compute ms':>17}{'beyond compute':>16}")
    for index in range(args.peers):
        trip = statistics.median(row[index][0] for row in rows)
        compute = statistics.median(row[index][1] for row in rows)
        print(f"{index:<6}{trip:>15.2f}{compute:>17.2f}{trip - compute:>16.2f}")
    total = statistics.median(sum(hop[0] for hop in row) for row in rows)
    print(f"all hops: {total:.1f} ms per step; unary Info round trip (transport floor): {floor:.2f} ms")
    print(f"({args.steps} one-position steps, medians, {os.cpu_count()} cores, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
