"""Failover under fire: many generations with peers killed mid-generation, against a local reference.

    python benchmarks/chaos.py                       # 100 generations, 2 kill -9 each
    python benchmarks/chaos.py --generations 20      # shorter
    python benchmarks/chaos.py --signal STOP         # hung peers instead of dead ones
    python benchmarks/chaos.py --no-batch-invariant  # default peers and client: replays merge decode steps

Each generation kills (or freezes) two peers on the route in use at random decode steps, checks
the tokens against transformers' greedy output on the same checkpoint, then restarts the peers
with the same identity. It prints how many generations completed with identical tokens and the
recovery time per failure (detection plus re-route plus replay) as min / median / max. Then it
measures how recovery grows with the replayed history: one kill after a prompt of 64, 256 and 1024
positions (one prefill step to replay), and after 64 and 256 decoded positions (one step per position).

Batch-invariant mode (the default here; ``--batch-invariant`` on peers, ``batch_invariant=True`` on the
client): peers compute one step per pass, and a replay sends every original step as its own message, so
the rebuilt cache, and every token after a failure, is bit for bit what it would have been. Its cost is
in the decoded-history rows (one pass per replayed decode step instead of one per message) and in
throughput under concurrency (no cross-session batching: ``benchmarks/throughput.py --batch-invariant``).
Forwarding (peers push activations to the next hop) is on, as it is for users.

The swarm: a 16-layer Llama shape (hidden 256) on 5 peers covering every layer twice with
different boundaries (the chaos test's layout, from tests/support/brigade_testkit.py).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see brigade/cli.py: peers share the cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import torch
from brigade_testkit import ChaosSwarm
from transformers import LlamaConfig, LlamaForCausalLM

from brigade.client import DistributedModelForCausalLM

LAYERS = 16
SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=LAYERS, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048, initializer_range=0.25,
             eos_token_id=None, bos_token_id=None, pad_token_id=None)
PEER_ARGS = ["--drain-grace", "1", "--announce-period", "1.5", "--record-ttl", "4"]


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"min {min(values) * 1000:.0f} ms / median {statistics.median(values) * 1000:.0f} ms / " \
           f"max {max(values) * 1000:.0f} ms (n={len(values)})"


def smallest_margin(reference: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """The reference's smallest top-1 minus top-2 logit gap over the generation, and its step.

    A gap below the fp32 agreement of two implementations (~1e-5 here) makes greedy decoding a
    coin toss at that step, with or without failover.
    """
    with torch.no_grad():
        out = reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    gaps = [float(scores[0].topk(2).values[0] - scores[0].topk(2).values[1]) for scores in out.scores]
    return min(gaps), gaps.index(min(gaps))


def generate_with_faults(model, prompt, new_tokens, fault_steps, fault) -> list[int]:
    tokens = prompt[0].tolist()
    for step, new in enumerate(model.stream(prompt, max_new_tokens=new_tokens)):
        tokens.append(int(new[0]))
        if step in fault_steps:
            fault(list(model.last_route))
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--signal", choices=["KILL", "STOP"], default="KILL")
    parser.add_argument("--history", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--decoded-history", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGSTOP
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="brigade-chaos-") as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        reference = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
        reference.save_pretrained(folder / "chaos-llama")
        peer_args = [*PEER_ARGS, "--batch-invariant"] if args.batch_invariant else PEER_ARGS
        chaos = ChaosSwarm(folder, folder / "chaos-llama", LAYERS, peer_args)
        try:
            chaos.start()
            model = DistributedModelForCausalLM.from_pretrained(str(folder / "chaos-llama"), chaos.swarm.initial_peers,
                                                                batch_invariant=args.batch_invariant)
            print(f"batch-invariant mode {'on' if args.batch_invariant else 'off'}, forwarding on", flush=True)
            completed, identical, recoveries, detections = 0, 0, [], []
            began = time.monotonic()
            for generation in range(args.generations):
                generator = torch.Generator().manual_seed(generation)
                prompt = torch.randint(0, SHAPE["vocab_size"], (1, 8), generator=generator)
                expected = reference.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[0].tolist()
                frozen = []

                def fault(route: list[str], frozen: list = frozen) -> None:
                    victim = chaos.pick_victim(route, rng)
                    if victim is not None:
                        victim.process.send_signal(sig)
                        if sig == signal.SIGKILL:
                            victim.process.wait(10)
                        frozen.append(victim)

                steps = set(rng.sample(range(1, args.new_tokens - 1), 2))
                try:
                    got = generate_with_faults(model, prompt, args.new_tokens, steps, fault)
                    completed += 1
                except Exception as error:  # counted and shown: the point of the run is that none happens
                    got = []
                    print(f"generation {generation + 1}: FAILED: {type(error).__name__}: {error}", flush=True)
                identical += got == expected
                failures = [e for e in model.last_events if e.kind == "failure"]
                recoveries += [e.recovery_s for e in failures]
                detections += [e.detected_after_s + e.recovery_s for e in failures]
                for peer in frozen:
                    peer.process.kill()
                    peer.process.wait(10)
                chaos.heal()
                verdict = "identical"
                if got and got != expected:
                    gap, step = smallest_margin(reference, prompt, args.new_tokens)
                    first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
                    verdict = (f"DIFF from new token {first - prompt.shape[1]} (reference's smallest top-2 logit gap: "
                               f"{gap:.1e} at step {step})")
                print(f"generation {generation + 1}/{args.generations}: {verdict}, {len(failures)} recoveries",
                      flush=True)
            print(f"\n{args.generations} generations with 2 x SIG{args.signal} each, "
                  f"{time.monotonic() - began:.0f} s in all")
            print(f"completed {completed}/{args.generations}, identical tokens {identical}/{args.generations}")
            print(f"detection + recovery per failure: {summary(detections)}")
            print(f"recovery alone (re-route, open, replay): {summary(recoveries)}")

            print("\nrecovery time against replayed history (one SIGKILL after H positions):")
            for history in args.history:
                prompt = torch.randint(0, SHAPE["vocab_size"], (1, history), generator=torch.Generator().manual_seed(7))
                times = _recoveries(chaos, model, prompt, 4, 1, rng)
                print(f"  prompt of {history:>5}: {summary(times)}")
            for history in args.decoded_history:
                prompt = torch.randint(0, SHAPE["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(7))
                times = _recoveries(chaos, model, prompt, history, history - 10, rng)
                print(f"  8 + {history - 8:>4} decoded: {summary(times)}")
            model.close()
        finally:
            chaos.swarm.close()
    return 0 if identical == args.generations else 1


def _recoveries(chaos: ChaosSwarm, model, prompt: torch.Tensor, new_tokens: int, kill_step: int,
                rng: random.Random) -> list[float]:
    """Recovery times of three generations, each with one SIGKILL after ``kill_step`` new tokens."""
    times = []
    for _ in range(3):
        generate_with_faults(model, prompt, new_tokens, {kill_step}, lambda route: _kill(chaos, route, rng))
        times += [e.recovery_s for e in model.last_events if e.kind == "failure"]
        chaos.heal()
    return times


def _kill(chaos: ChaosSwarm, route: list[str], rng: random.Random) -> None:
    victim = chaos.pick_victim(route, rng)
    if victim is not None:
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)


if __name__ == "__main__":
    sys.exit(main())
