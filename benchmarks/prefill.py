"""Time to first token for a 2,048-token prompt over 4 hops: pipelined prefill vs hop after hop.

    python benchmarks/prefill.py                    # ~250M Llama shape (hidden 1024, 16 layers)
    python benchmarks/prefill.py --small            # a quick run on a tiny shape

Four peers of 4 layers each, each with one compute thread (``--num-threads 1``): each stands for
a machine of its own, though on a 2-core box at most two of them compute at once, which caps what
pipelining can win here at about 2x (on 4 machines the cap is the hop count). Peers chunk the
prefill (``--prefill-chunk-tokens``); the setups differ in when a hop's output chunk moves on:

- sequential: client-driven hops, each hop's whole output is gathered before the next hop starts
  (Petals' behaviour);
- client-pipelined: client-driven hops, each chunk is passed to the next hop as soon as it arrives;
- forwarding: peers send each chunk straight to the next peer (the default).

Time to first token is measured from sending the prompt's embeddings to having the first token
(session set-up excluded; the head runs on the client). Setups alternate for ``--rounds`` rounds
and the median is printed, with local transformers' prefill of the same prompt for reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `brigade` entry point sets it

import torch
from decode_latency import SHAPES, build_checkpoint

from brigade.client import DistributedModelForCausalLM
from brigade.client.session import InferenceSession
from brigade.demo import split_layers
from brigade.deploy.launcher import LocalSwarm

SETUPS = {
    "sequential": dict(forwarding=False, pipeline_prefill=False),
    "client-pipelined": dict(forwarding=False, pipeline_prefill=True),
    "forwarding": dict(forwarding=True, pipeline_prefill=True),
}


async def first_token(model: DistributedModelForCausalLM, prompt: torch.Tensor) -> tuple[float, int, int]:
    """(seconds to the first token, that token, hops) for one fresh session."""
    session = InferenceSession(model.swarm, model.standing, 1, prompt.shape[1] + 1, [0])
    await session.open()
    try:
        began = time.perf_counter()
        out = await session.step(model.head.embed(prompt))
        token = int(model.head.logits(out[:, -1]).argmax(-1))
        return time.perf_counter() - began, token, len(session.hops)
    finally:
        await session.close()


def local_first_token(checkpoint: Path, prompt: torch.Tensor) -> tuple[float, int]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        model(prompt[:, :16])  # warm-up
        began = time.perf_counter()
        logits = model(prompt).logits
        return time.perf_counter() - began, int(logits[0, -1].argmax())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shape for a quick check")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="peers' --prefill-chunk-tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shape = SHAPES["small" if args.small else "250m"]
    peer_args = ["--drain-grace", "1", "--num-threads", "1", "--prefill-chunk-tokens", str(args.chunk_tokens),
                 "--client-cache-share", "1.0",
                 "--cache-tokens", str(2 * (args.prompt_tokens + 64))]

    with tempfile.TemporaryDirectory(prefix="brigade-bench-") as tmp:
        checkpoint = Path(tmp) / "llama-bench"
        build_checkpoint(checkpoint, shape, max_positions=args.prompt_tokens + 64)
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt_tokens), generator=generator)
        local_s, local_token = local_first_token(checkpoint, prompt)
        times: dict[str, list[float]] = {name: [] for name in SETUPS}
        tokens: set[int] = {local_token}
        with LocalSwarm(Path(tmp) / "swarm") as swarm:
            swarm.start_bootstrap()
            launched = [swarm.add_peer(str(checkpoint), span, wait=False, extra_args=peer_args)
                        for span in split_layers(shape["num_hidden_layers"], args.peers)]
            for peer in launched:
                swarm.wait_ready(peer)
            with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
                base = model.client_config
                model._loop.run(first_token(model, prompt[:, :64]), 300)  # warm-up: connections
                for _ in range(args.rounds):
                    for name, options in SETUPS.items():
                        model.swarm.config = model.client_config = replace(base, **options)
                        seconds, token, hops = model._loop.run(first_token(model, prompt), 1200)
                        times[name].append(seconds)
                        tokens.add(token)
                        print(f"  {name}: {1000 * seconds:.0f} ms over {hops} hops", flush=True)
    sequential = statistics.median(times["sequential"])
    print(f"\n{'setup':<20}{'first token ms':>16}{'vs sequential':>15}")
    print(f"{'local transformers':<20}{1000 * local_s:>16.0f}{local_s / sequential:>15.2f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<20}{1000 * median:>16.0f}{median / sequential:>15.2f}")
    print(f"same first token everywhere: {'yes' if len(tokens) == 1 else 'NO'}")
    print(f"({args.prompt_tokens}-token prompt, {args.peers} peers with 1 thread each, chunks of {args.chunk_tokens}, "
          f"median of {args.rounds} rounds, {os.cpu_count()} cores, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
