"""Per-token latency across a wide-area swarm: the testbed's link profiles, 2 to 8 hops.

    sudo python benchmarks/wan.py                                  # lan, internet, bad x 2, 4, 8 hops
    sudo python benchmarks/wan.py --profiles internet --hops 4 --new-tokens 32

Each (profile, hop count) gets a fresh testbed (deploy/testbed: one network namespace per peer,
tbf bandwidth, a delay proxy or netem for latency), peers splitting an 8-layer Llama-shaped
checkpoint built here from a fixed seed, and a client on its own host. It prints ms/token (decode
steps after the first token) against the floor of the mode on the route the client actually used:
one round trip per hop when the client calls each hop (``client``), one way into each hop plus one
way back from the last when peers forward (``forwarding``). What is above the floor is compute,
serialization and the client's own work per hop.

``--modes`` names how tokens travel through the pipeline (``brigade.deploy.testbed.client.MODES``),
e.g. ``--modes client,forwarding``; every mode runs on the same testbed, on the same links.

Needs root (network namespaces). Starts up to 10 processes per testbed: take the shared swarm
lock on a shared machine (``flock /tmp/brigade-swarm.lock python benchmarks/wan.py``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from brigade.demo import split_layers
from brigade.deploy.testbed import PROFILES, Testbed, TestbedConfig, namespaces_available
from brigade.deploy.testbed.client import MODES

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024, initializer_range=0.25)
PROMPT = [11, 42, 7, 1999, 305, 64, 2048, 3, 90, 17, 511, 8]


def build_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).eval().save_pretrained(folder)
    return folder


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="lan,internet,bad", help=f"comma-separated: {', '.join(PROFILES)}")
    parser.add_argument("--hops", default="2,4,8", help="comma-separated peer counts (at most 8: one layer each)")
    parser.add_argument("--modes", default="client,forwarding", help=f"comma-separated: {', '.join(sorted(MODES))}")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="draws the peers' round trips within a profile")
    parser.add_argument("--emulation", default="auto", help="auto | proxy | netem")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    reason = namespaces_available()
    if reason:
        sys.exit(f"wan.py cannot run here: {reason}")
    profiles, modes = _csv(options.profiles), _csv(options.modes)
    hops_list = [int(hops) for hops in _csv(options.hops)]
    for name in profiles:
        if name not in PROFILES:
            sys.exit(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    for mode in modes:
        if mode not in MODES:
            sys.exit(f"unknown mode {mode!r}; choose from {', '.join(sorted(MODES))}")
    if any(not 1 <= hops <= SHAPE["num_hidden_layers"] for hops in hops_list):
        sys.exit(f"--hops must be between 1 and {SHAPE['num_hidden_layers']}")

    with tempfile.TemporaryDirectory(prefix="brigade-wan-") as folder:
        checkpoint = build_checkpoint(Path(folder) / "llama-8l")
        header = (f"{'profile':<9} {'hops':>4}  {'mode':<8} {'ms/token':>9} {'median':>8} {'floor ms':>9} "
                  f"{'above floor':>11} {'x floor':>8} {'1st token':>10}  same tokens")
        print(header)
        print("-" * len(header))
        began = time.monotonic()
        reference: list[int] | None = None
        for name in profiles:
            for hops in hops_list:
                spans = tuple(split_layers(SHAPE["num_hidden_layers"], hops))
                config = TestbedConfig(model=str(checkpoint), spans=spans, profile=name, seed=options.seed,
                                       emulation=options.emulation, log_dir=str(Path(folder) / f"{name}-{hops}"))
                with Testbed(config) as testbed:
                    for mode in modes:
                        result = testbed.generate(prompt_ids=PROMPT, new_tokens=options.new_tokens, mode=mode)
                        reference = reference or result.tokens
                        steps = result.step_ms
                        median = statistics.median(steps) if steps else float("nan")
                        floor = result.floor_ms
                        print(f"{name:<9} {len(result.hops):>4}  {mode:<8} {result.ms_per_token:>9.1f} {median:>8.1f} "
                              f"{floor:>9.1f} {result.ms_per_token - floor:>11.1f} "
                              f"{result.ms_per_token / floor if floor else float('nan'):>8.2f} "
                              f"{result.first_token_ms:>10.0f}  {'yes' if result.tokens == reference else 'NO'}",
                              flush=True)
        print(f"({options.new_tokens} greedy tokens per run, ms/token = mean decode step after the first token; "
              "floor: client = the route's round trips, forwarding = one way per hop + one back; "
              f"8-layer Llama, hidden {SHAPE['hidden_size']}, fp32 CPU, "
              f"1 torch thread per peer; {time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
