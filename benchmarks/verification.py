"""Result verification: tolerances, detection, false positives, and what checks cost.

    python benchmarks/verification.py                  # everything, at the client's defaults
    python benchmarks/verification.py --calibrate      # only the tolerance calibration (no swarm)
    python benchmarks/verification.py --runs 50        # more runs per cheater

1. Calibration (in this process, the kernels peers run): each precision computes spans of the
   embedded trained model decode-step by decode-step over 400 tokens of real Python, against a
   float32 prefill of the same inputs (what a check compares). Prints the largest honest error
   ratio |y - z| / (min delta + |x|) per precision against its tolerance (client/verify/compare.py).
2. Detection: the cheating swarm of tests/support/brigade_evil.py (8 real peer processes). Runs of
   one session each through a route with one cheater (a layer skipped, noise of 0.2 x the span's
   RMS, a lying History) at the default rate (5%, stratified), until the cheater is dropped or 60
   windows pass. Prints the share of runs caught within 60 windows and the window they were
   caught at. The embedded model takes 512 positions, so 60 windows of the default 16 steps do not
   fit one session: detection and false-positive runs use the longest window that fits (8 steps;
   the rate is per window, whatever its length), the overhead runs the default window.
3. False positives: honest routes of mixed precision (float32, bfloat16, nf4) for 60 windows each,
   every other peer (cheaters too) free to re-run checks; plus every check of an honest hop in the
   detection runs. Prints honest hop checks, how many accused an honest peer, the largest score.
4. Overhead, on one honest route with the cheaters already distrusted, sessions (as many windows of
   the default 16 steps as fit) with and without checks interleaved: ms per token, CPU seconds of
   all peer processes (the checks' compute), and positions re-run per position computed.

Every peer runs on this machine's cores, so re-runs compete with the session for CPU: the latency
overhead here is an upper bound of what separate machines would see. Timings are noisy when
other work shares the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see brigade/cli.py: peers share the cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import torch
from brigade_evil import CHEATERS, MODEL, CheatSwarm, RunOutcome, run_session

from brigade.client import ClientConfig, DistributedModelForCausalLM
from brigade.client.verify.compare import PRECISION_TOLERANCE
from brigade.kernels.cache import KVCache
from brigade.kernels.loading import load_head, load_span
from brigade.kernels.quant import quantize_span

PROMPT = 16
PRECISIONS = [("float32", torch.float32, "none"), ("float16", torch.float16, "none"),
              ("bfloat16", torch.bfloat16, "none"), ("int8", torch.float32, "int8"), ("nf4", torch.float32, "nf4")]
DETECTION_ROUTES = {
    "a_skip (skips 1 of 3 layers)": [["a_skip", "b32"], ["a_skip", "b16"], ["a_skip", "b4"]],
    "b_noise (noise 0.2)": [["a32", "b_noise"], ["a16", "b_noise"]],
    "b_lie (alters History)": [["a32", "b_lie"], ["a16", "b_lie"]],
}
HONEST_ROUTES = [["a16", "b4"], ["a32", "b16"], ["a16", "b32"], ["a32", "b4"]]


def calibrate() -> None:
    """Largest honest error ratio per precision: decode steps against a float32 prefill."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    ids = torch.tensor([tokenizer(text)["input_ids"][:400]])
    embedded = load_head(MODEL).embed(ids)
    print("calibration: largest |y - z| / (min delta + |x|), decode steps vs a float32 prefill, 400 tokens")

    def run(start: int, end: int, dtype: torch.dtype, quant: str, x: torch.Tensor, decode_from: int) -> torch.Tensor:
        span = quantize_span(load_span(MODEL, start, end, dtype=dtype), quant)
        args = span.args
        cache = KVCache.allocate(start, end, 1, args.num_kv_heads, args.head_dim, x.shape[1], dtype)
        pads = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            outputs = [span(x[:, :decode_from].to(dtype), pads, cache).float()]
            for position in range(decode_from, x.shape[1]):
                outputs.append(span(x[:, position : position + 1].to(dtype), pads, cache).float())
        return torch.cat(outputs, dim=1)

    worst = dict.fromkeys([name for name, _, _ in PRECISIONS], 0.0)
    for start, end in [(0, 3), (3, 6), (0, 1), (5, 6)]:
        x = embedded if start == 0 else run(0, start, torch.float32, "none", embedded, embedded.shape[1] - 1)
        z = run(start, end, torch.float32, "none", x, x.shape[1] - 1)  # the prefill a check runs
        row = []
        for name, dtype, quant in PRECISIONS:
            y = run(start, end, dtype, quant, x, 8)
            added = torch.minimum((y - x).norm(dim=-1), (z - x).norm(dim=-1))
            ratio = float(((y - z).norm(dim=-1) / (added + x.norm(dim=-1))).max())
            worst[name] = max(worst[name], ratio)
            row.append(f"{name} {ratio:.2e}")
        print(f"  layers {start}:{end}: " + ", ".join(row))
    for name, _, quant in PRECISIONS:
        tolerance = PRECISION_TOLERANCE[quant if quant != "none" else name]
        if quant != "none":
            tolerance += PRECISION_TOLERANCE["float32"]
        print(f"  {name:9s} worst {worst[name]:.2e}  tolerance {tolerance:.3f}  margin {tolerance / worst[name]:7.1f}x")


def tokens_for(seed: int, length: int) -> torch.Tensor:
    return torch.randint(3, 4096, (1, length), generator=torch.Generator().manual_seed(seed))


def detection(model: DistributedModelForCausalLM, swarm: CheatSwarm, runs: int, windows: int,
              window: int) -> list[RunOutcome]:
    print(f"\ndetection: {runs} runs per cheater, rate {model.client_config.verify_rate:.0%} "
          f"({model.client_config.verify_schedule}), windows of {window} steps, up to {windows} windows")
    everything = []
    for label, routes in DETECTION_ROUTES.items():
        outcomes = []
        began = time.monotonic()
        for run in range(runs):
            route = routes[run % len(routes)]
            tokens = tokens_for(1000 + run, PROMPT + windows * window - 1)
            outcomes.append(model._loop.run(run_session(model, swarm, route, tokens, PROMPT, window, seed=None,
                                                        stop_when_caught=True), 600.0))
        caught = [outcome.caught_window for outcome in outcomes if outcome.caught_window is not None]
        within = sum(1 for index in caught if index < windows)
        kinds = {report.kind for outcome in outcomes for report in outcome.reports
                 if swarm.ids[outcome.cheater or ""] in report.accused}
        verdict_s = [result.seconds for outcome in outcomes for result in outcome.results
                     if result.outcome == "caught" and swarm.ids[outcome.cheater or ""] in result.accused]
        print(f"  {label:30s} caught in {within}/{runs} runs ({within / runs:.0%}) within {windows} windows; "
              f"at window mean {statistics.mean(caught) if caught else float('nan'):.1f}, "
              f"max {max(caught) if caught else '-'} (0-based); as {sorted(kinds)}; the catching check took "
              f"{statistics.median(verdict_s) if verdict_s else float('nan'):.2f} s median, "
              f"{max(verdict_s) if verdict_s else float('nan'):.2f} s max; {time.monotonic() - began:.0f} s")
        everything += outcomes
    return everything


def honest(model: DistributedModelForCausalLM, swarm: CheatSwarm, windows: int, window: int) -> list[RunOutcome]:
    outcomes = []
    for run, route in enumerate(HONEST_ROUTES):
        tokens = tokens_for(2000 + run, PROMPT + windows * window - 1)
        outcomes.append(model._loop.run(run_session(model, swarm, route, tokens, PROMPT, window), 600.0))
    return outcomes


def false_positives(swarm: CheatSwarm, outcomes: list[RunOutcome]) -> None:
    checks = accused_honest = unresolved = 0
    worst = 0.0
    by_precision: dict[str, int] = {}
    for outcome in outcomes:
        for report in outcome.reports:
            accused_honest += sum(1 for peer_id in report.accused if swarm.names[peer_id] not in CHEATERS)
        for result in outcome.results:
            if swarm.names[result.peer_id] in CHEATERS or result.outcome.startswith("skipped"):
                continue
            checks += 1
            unresolved += result.outcome == "unresolved"
            by_precision[result.precision] = by_precision.get(result.precision, 0) + 1
            worst = max(worst, result.scores.get("suspect/checker", 0.0) if result.outcome == "passed" else 0.0)
    print(f"\nfalse positives: {checks} checks of honest hops ({by_precision}); honest peers accused "
          f"{accused_honest} times ({accused_honest / max(1, checks):.1%}); unresolved {unresolved}; "
          f"largest honest score {worst:.3f} (1 = tolerance)")


def overhead(model: DistributedModelForCausalLM, swarm: CheatSwarm, pairs: int, windows: int, window: int) -> None:
    route = ["a32", "b32"]
    steps = {True: [], False: []}
    cpu = {True: 0.0, False: 0.0}
    rerun = computed = 0
    for pair in range(pairs):
        tokens = tokens_for(3000 + pair, PROMPT + windows * window - 1)
        for verify in (pair % 2 == 0, pair % 2 == 1):  # alternate which goes first
            before = swarm.cpu_seconds()
            outcome = model._loop.run(run_session(model, swarm, route, tokens, PROMPT, window, verify=verify,
                                                  distrust=tuple(sorted(CHEATERS))), 600.0)
            cpu[verify] += swarm.cpu_seconds() - before
            steps[verify] += outcome.step_s
            if verify:
                rerun += outcome.stats.rerun_positions
                computed += outcome.positions * len(outcome.route)
    on, off = statistics.mean(steps[True]) * 1000, statistics.mean(steps[False]) * 1000
    print(f"\noverhead on {'+'.join(route)} ({pairs} sessions each way, {windows} windows of {window}, "
          f"rate {model.client_config.verify_rate:.0%}):")
    print(f"  latency: {on:.2f} ms/token with checks, {off:.2f} without: {on / off - 1:+.1%} "
          f"(median {statistics.median(steps[True]) * 1000:.2f} vs {statistics.median(steps[False]) * 1000:.2f})")
    print(f"  compute: peers' CPU {cpu[True]:.1f} s with checks, {cpu[False]:.1f} s without: "
          f"{cpu[True] / cpu[False] - 1:+.1%}; positions re-run / computed {rerun}/{computed} = {rerun / computed:.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="only the calibration (no swarm)")
    parser.add_argument("--runs", type=int, default=20, help="detection runs per cheater")
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--window", type=int, default=ClientConfig.verify_window, help="steps per window")
    parser.add_argument("--pairs", type=int, default=8, help="sessions with and without checks, for overhead")
    args = parser.parse_args()
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(MODEL).max_position_embeddings
    fit = max(1, min(args.window, (context - PROMPT) // args.windows))  # steps per window in detection runs
    overhead_windows = max(1, (context - PROMPT) // args.window)
    calibrate()
    if args.calibrate:
        return 0
    swarm = CheatSwarm(Path(tempfile.mkdtemp(prefix="brigade-verification-")))
    began = time.monotonic()
    swarm.start()
    print(f"\nswarm: {len(swarm.layout)} peers up in {time.monotonic() - began:.0f} s")
    try:
        with DistributedModelForCausalLM.from_pretrained(MODEL, swarm.swarm.initial_peers,
                                                         verify_window=fit) as model:
            detected = detection(model, swarm, args.runs, args.windows, fit)
            false_positives(swarm, detected + honest(model, swarm, args.windows, fit))
        with DistributedModelForCausalLM.from_pretrained(MODEL, swarm.swarm.initial_peers,
                                                         verify_window=args.window) as model:
            overhead(model, swarm, args.pairs, overhead_windows, args.window)
    finally:
        swarm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
