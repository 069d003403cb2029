"""Per-token decode latency: local transformers vs the swarm over 2 and 4 peers on loopback.

    python benchmarks/decode_latency.py            # ~250M Llama shape (hidden 1024, 16 layers)
    python benchmarks/decode_latency.py --small    # a quick run on a tiny shape

Builds the checkpoint locally (random weights, fixed seed), then for each setup times 64 greedy
decode steps after the prompt: ms/token is the mean gap between consecutive tokens, prefill
excluded. The local and swarm runs alternate for ``--rounds`` rounds and the median is reported,
since the machine is shared and noisy; ratios come from one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each side runs as its users run it: local transformers in a fresh process with default settings
# (``--local-only``, spawned per round), the swarm's client here with OMP_WAIT_POLICY=PASSIVE as the
# `brigade` entry point sets it (idle OpenMP threads must not spin while the peers compute).
if "--local-only" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from brigade.client import DistributedModelForCausalLM
from brigade.demo import split_layers
from brigade.deploy.launcher import LocalSwarm

SHAPES = {
    "250m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096),
}


class TokenClock:
    """A transformers-style streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # generate() first passes the prompt
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ms_per_token(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return 1000 * statistics.mean(gaps)


def build_checkpoint(folder: Path, shape: dict[str, int], max_positions: int = 2048) -> LlamaForCausalLM:
    config = LlamaConfig(**shape, max_position_embeddings=max_positions, initializer_range=0.02,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: {params / 1e6:.0f}M parameters, {shape['num_hidden_layers']} layers, "
          f"hidden {shape['hidden_size']} at {folder}")
    return model


def time_local(model: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    clock = TokenClock()
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return clock.ms_per_token(), out[0].tolist()


def time_local_process(checkpoint: Path, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Local transformers in a fresh process with the default environment, as a plain user runs it."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    command = [sys.executable, __file__, "--local-only", str(checkpoint), "--new-tokens", str(new_tokens),
               "--prompt", ",".join(str(t) for t in prompt[0].tolist())]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600).stdout
    result = json.loads(output.strip().splitlines()[-1])
    return result["ms_per_token"], result["tokens"]


def local_only(checkpoint: str, prompt_text: str, new_tokens: int) -> int:
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[int(t) for t in prompt_text.split(",")]])
    time_local(model, prompt, 4)  # warm-up
    ms, tokens = time_local(model, prompt, new_tokens)
    print(json.dumps({"ms_per_token": ms, "tokens": tokens}))
    return 0


def time_swarm(model: DistributedModelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    clock = TokenClock()
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return clock.ms_per_token(), out[0].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shape for a quick check")
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="swarm sizes to measure")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-only", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_only:
        return local_only(args.local_only, args.prompt, args.new_tokens)
    shape = SHAPES["small" if args.small else "250m"]
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="brigade-bench-") as tmp:
        checkpoint = Path(tmp) / "llama-bench"
        build_checkpoint(checkpoint, shape)
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt_tokens), generator=generator)
        rows: list[tuple[str, float, bool]] = []
        local_times: list[float] = []
        for peers in args.peers:
            spans = split_layers(shape["num_hidden_layers"], peers)
            with LocalSwarm(Path(tmp) / f"swarm-{peers}") as swarm:
                swarm.start_bootstrap()
                launched = [swarm.add_peer(str(checkpoint), span, wait=False, extra_args=["--drain-grace", "1"])
                            for span in spans]
                for peer in launched:
                    swarm.wait_ready(peer)
                with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as remote:
                    time_swarm(remote, prompt, 4)  # warm-up: connections, allocator
                    swarm_times, same = [], True
                    for _ in range(args.rounds):
                        local_ms, local_tokens = time_local_process(checkpoint, prompt, args.new_tokens)
                        swarm_ms, swarm_tokens = time_swarm(remote, prompt, args.new_tokens)
                        local_times.append(local_ms)
                        swarm_times.append(swarm_ms)
                        same &= local_tokens == swarm_tokens
                    rows.append((f"swarm, {peers} peers", statistics.median(swarm_times), same))
                    print(f"  {peers} peers: route {' -> '.join(remote.last_route)}", flush=True)
        local_ms = statistics.median(local_times)
    print(f"\n{'setup':<22}{'ms/token':>10}{'vs local':>10}  same tokens")
    print(f"{'local transformers':<22}{local_ms:>10.1f}{1.0:>10.2f}")
    for name, ms, same in rows:
        print(f"{name:<22}{ms:>10.1f}{ms / local_ms:>10.2f}  {'yes' if same else 'NO'}")
    print(f"({args.new_tokens} greedy decode steps, median of {args.rounds} rounds, {os.cpu_count()} cores, "
          f"torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
