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
e.g. ``--modes client,forwarding,speculative``; every mode runs on the same testbed, on the same
links. ``speculative`` is forwarding plus a local draft model whose tokens the swarm checks several
per step; its floor is forwarding's (one step's trips), which it goes below by settling several
tokens per step. The draft is the benchmark's checkpoint with its decoder weights perturbed by
``--draft-noise`` (times each weight's spread): as costly to run as the model itself on the
client, and right on a fraction of tokens that the noise sets. Its line adds the acceptance rate,
the settled tokens per step, the mean drafted k and the draft's time per drafted token.

``--one-way-ms`` gives every peer the same fixed delay each way instead of the profile's range
(the issue's figure: 4 hops behind the delay proxy at 25 ms one-way):

    sudo python benchmarks/wan.py --profiles lan --hops 4 --one-way-ms 25 --emulation proxy \
        --modes client,forwarding,speculative --new-tokens 48

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
from brigade.deploy.testbed.runner import GenerationResult

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024, initializer_range=0.25)
PROMPT = [11, 42, 7, 1999, 305, 64, 2048, 3, 90, 17, 511, 8]


def build_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).eval().save_pretrained(folder)
    return folder


def build_draft(checkpoint: Path, folder: Path, noise: float) -> Path:
    """The checkpoint with noise on its decoder weights: a draft that is right on some tokens, not all."""
    draft = LlamaForCausalLM.from_pretrained(checkpoint).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in draft.named_parameters():
            if ".layers." in name:
                weight.add_(torch.randn(weight.shape, generator=generator) * noise * weight.std())
    draft.save_pretrained(folder)
    return folder


def _decode_ms(result: GenerationResult) -> tuple[float, float]:
    """ms/token after the first step, and the median step.

    Plain decoding: the mean and median gap between tokens after the first. Speculation settles
    several tokens per step (the first step too), so its ms/token counts only the tokens settled
    after the first step, and its median is the median round (draft plus swarm step).
    """
    stats = result.speculation
    if not stats:
        steps = result.step_ms
        return result.ms_per_token, statistics.median(steps) if steps else float("nan")
    first = int(stats["first_step_tokens"])
    times = result.token_times_s
    if len(times) <= first:
        return float("nan"), float("nan")
    return 1000 * (times[-1] - times[first - 1]) / (len(times) - first), stats["median_round_ms"]


def _speculation(result: GenerationResult) -> str:
    stats = result.speculation
    if not stats:
        return ""
    return (f"  acceptance {stats['acceptance_rate']:.0%} (draft right on {stats['draft_agreement']:.0%} "
            f"of checked tokens), {stats['tokens_per_step']:.2f} tokens/step, "
            f"mean k {stats['mean_k']:.1f}, draft {stats['draft_ms_per_token']:.1f} ms/drafted token")


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
    parser.add_argument("--one-way-ms", type=float, default=None,
                        help="every peer's delay each way, instead of the profile's range of round trips")
    parser.add_argument("--draft-noise", type=float, default=0.01,
                        help="the speculative mode's draft: noise on the model's weights (sets its acceptance)")
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
        draft = build_draft(checkpoint, Path(folder) / "draft", options.draft_noise) if "speculative" in modes else None
        rtt_ms = None if options.one_way_ms is None else 2 * options.one_way_ms
        header = (f"{'profile':<9} {'hops':>4}  {'mode':<11} {'ms/token':>9} {'median':>8} {'floor ms':>9} "
                  f"{'above floor':>11} {'x floor':>8} {'compute':>8} {'x f+c':>6} {'1st token':>10}  same tokens")
        print(header)
        print("-" * len(header))
        began = time.monotonic()
        reference: list[int] | None = None
        for name in profiles:
            for hops in hops_list:
                spans = tuple(split_layers(SHAPE["num_hidden_layers"], hops))
                config = TestbedConfig(model=str(checkpoint), spans=spans, profile=name, seed=options.seed,
                                       rtt_ms=rtt_ms, emulation=options.emulation,
                                       log_dir=str(Path(folder) / f"{name}-{hops}"))
                with Testbed(config) as testbed:
                    for mode in modes:
                        result = testbed.generate(prompt_ids=PROMPT, new_tokens=options.new_tokens, mode=mode,
                                                  draft_model=str(draft) if mode == "speculative" else None)
                        reference = reference or result.tokens
                        ms_per_token, median = _decode_ms(result)
                        floor = result.floor_ms
                        compute = result.compute_ms if result.compute_ms is not None else float("nan")
                        print(f"{name:<9} {len(result.hops):>4}  {mode:<11} {ms_per_token:>9.1f} {median:>8.1f} "
                              f"{floor:>9.1f} {ms_per_token - floor:>11.1f} "
                              f"{ms_per_token / floor if floor else float('nan'):>8.2f} "
                              f"{compute:>8.1f} {ms_per_token / (floor + compute):>6.2f} "
                              f"{result.first_token_ms:>10.0f}  {'yes' if result.tokens == reference else 'NO'}"
                              f"{_speculation(result)}",
                              flush=True)
        print(f"({options.new_tokens} greedy tokens per run, ms/token = mean decode step after the first token; "
              "floor: client = the route's round trips, forwarding and speculative = one way per hop + one back; "
              "speculative: ms/token after the first step, median of rounds (draft + step); "
              "compute: the peers' compute per token (Info.compute_seconds), x f+c: ms/token / (floor + compute); "
              f"8-layer Llama, hidden {SHAPE['hidden_size']}, fp32 CPU, "
              f"1 torch thread per peer; {time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
