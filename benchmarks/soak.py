"""Soak: concurrent clients on a swarm whose peers are killed, stopped, drained and restarted all along.

    python benchmarks/soak.py                               # 30 minutes, 4 clients, 6 peers, a fault every 30 s
    python benchmarks/soak.py --minutes 3 --fault-period 20 # a smoke run
    python benchmarks/soak.py --no-batch-invariant          # peers batch sessions freely

Each client thread has its own DistributedModelForCausalLM and loops greedy generations (prompts and
lengths drawn from --seed; ``generate`` and ``stream`` in turn at random), each compared with
transformers' greedy output on the same checkpoint. A fault thread takes one action per period, in
rotation: SIGKILL a peer, SIGSTOP one (woken after 10 s), drain one (SIGTERM: it says it is leaving
and lets sessions finish), restart whatever is down with the same identity. No fault takes the last
live copy of a layer. Every minute a line gives the generations so far and each peer's RSS, threads
and open fds (from /proc).

At the end the faults stop, the swarm heals, the clients close, and after the peers' session idle
timeout each peer must hold no session and no cache page, and have no more event-loop tasks, threads
and fds than right after its (re)start plus a fixed slack (below). Processes left in a dead
incarnation's process group count as leaks too. It prints each peer's RSS from its first minute (or
its restart) to the last, a verdict line, and exits 1 on any failed or differing generation or leak.

With several clients a peer batches their steps into one pass, which may change the floats; the
batch-invariant mode (peer --batch-invariant, ClientConfig.batch_invariant) makes a step's result
independent of its batch, and is on by default here.

The swarm: an 8-layer Llama (hidden 128) on 6 peers, every layer on at least two of them with
different boundaries; a real DHT and real gRPC on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see brigade/cli.py: peers share the cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import torch
from brigade_soak import DRAIN_EXIT_S, SoakSwarm, Usage, dump_stuck, peer_usage, proc_usage, wait_until
from brigade_testkit import FAST_PEER_ARGS, assert_tokens_vary, build_model

from brigade.client import DistributedModelForCausalLM

SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=8, vocab_size=1024)  # over TINY_SHAPE
# Every layer on two or three peers, boundaries staggered so that a replacement may be one peer or two.
SPANS = [(0, 4), (4, 8), (0, 3), (3, 6), (6, 8), (2, 7)]
IDLE_TIMEOUT_S = 60.0  # peers' --session-idle-timeout: what the end waits out before counting sessions
STOP_S = 10.0  # how long a SIGSTOPped peer stays frozen
FAULTS = ("kill", "stop", "drain", "restart")
PROMPTS = 32  # distinct prompts drawn from the seed; references are cached by prompt
MAX_NEW = 32  # references run this far; a shorter generation is compared with their prefix
# A prompt whose reference has a top-2 logit gap below this at some step is skipped: two correct fp32
# implementations may pick either token there (see chaos.py's smallest_margin).
MIN_GAP = 1e-3
# Leak slack over the count right after (re)start: a peer opens channels to the peers it forwards
# to and pings (one fd each, up to 5 peers, plus a reconnecting one each) and torch / gRPC start a
# few worker threads on first use; more than this grows with time, not with the swarm.
SLACK = {"tasks": 4, "threads": 8, "fds": 16}
# Threads the first client starts for the whole process and never stops (hivemind's MPFuture backend,
# two of gRPC's): the same after one client or many; a thread leaked per client shows from 4 clients on.
CLIENT_THREAD_SLACK = 3
SLOW_S = 60.0  # a generation this long is printed with its recoveries
STUCK_S = 180.0  # a generation running this long has its stacks dumped at the next minute line
RSS_GROWTH = (1.2, 32.0)  # an incarnation seen for 10 minutes or more may grow by 20% + 32 MiB at most


@dataclass
class Tally:
    """Generations of all clients; changed under ``lock`` by the client threads."""

    completed: int = 0
    identical: int = 0
    failed: int = 0
    running_since: dict[int, float] = field(default_factory=dict)  # client -> when its generation began
    lock: threading.Lock = field(default_factory=threading.Lock)


class References:
    """Transformers' greedy tokens per prompt, computed once (under a lock: one reference model)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._cache: dict[tuple[int, ...], list[int] | None] = {}
        self._lock = threading.Lock()

    def get(self, prompt: tuple[int, ...]) -> list[int] | None:
        """The prompt plus MAX_NEW greedy tokens, or None when a step is a near tie (MIN_GAP)."""
        with self._lock:
            if prompt not in self._cache:
                with torch.no_grad():
                    out = self.model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                              output_scores=True, return_dict_in_generate=True)
                gaps = [float(top[0, 0] - top[0, 1]) for top in (s.topk(2).values for s in out.scores)]
                self._cache[prompt] = out.sequences[0].tolist() if min(gaps) >= MIN_GAP else None
            return self._cache[prompt]

    def ties(self) -> int:
        with self._lock:
            return sum(tokens is None for tokens in self._cache.values())


def client_loop(index: int, model: DistributedModelForCausalLM, prompts: list[tuple[int, ...]],
                references: References, tally: Tally, rng: random.Random, stop: threading.Event) -> None:
    """Generations until ``stop``; an exception is a failed generation (printed), never the thread's end."""
    generation = 0
    while not stop.is_set():
        prompt = rng.choice(prompts)
        new_tokens = rng.randint(8, MAX_NEW)
        use_stream = rng.random() < 0.5
        expected = references.get(prompt)
        if expected is None:
            continue
        expected = expected[: len(prompt) + new_tokens]
        generation += 1
        ids = torch.tensor([prompt])
        began = time.monotonic()
        tally.running_since[index] = began
        try:
            if use_stream:
                got = [*prompt, *(int(token[0]) for token in model.stream(ids, max_new_tokens=new_tokens))]
            else:
                got = model.generate(ids, max_new_tokens=new_tokens)[0].tolist()
        except Exception as error:  # a failed generation is what this counts
            with tally.lock:
                tally.failed += 1
            print(f"client {index} generation {generation} FAILED after {time.monotonic() - began:.1f} s: "
                  f"{type(error).__name__}: {error}", flush=True)
            traceback.print_exc(limit=3)
            continue
        finally:
            tally.running_since.pop(index, None)
        took = time.monotonic() - began
        if took > SLOW_S:  # a long wait that ended: which recoveries it went through
            print(f"client {index} generation {generation} SLOW: {took:.0f} s; events: "
                  + "; ".join(f"{event.kind} {event.peer_id[:12]} {event.reason[:120]} ({event.recovery_s:.1f} s)"
                              for event in model.last_events), flush=True)
        with tally.lock:
            tally.completed += 1
            tally.identical += got == expected
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), len(got))
            print(f"client {index} generation {generation} DIFF from new token {first - len(prompt)} "
                  f"({'stream' if use_stream else 'generate'}, prompt of {len(prompt)})", flush=True)


def fault_loop(soak: SoakSwarm, period_s: float, rng: random.Random, shutdown: threading.Event,
               began: float, errors: list[str]) -> None:
    """One fault per period; one that took longer (a restart waits for peers to load) is followed by the
    next at once, never by a burst of the missed ones."""
    next_at = began + period_s
    for number in itertools.count():
        if not wait_until(next_at, shutdown):
            return
        next_at = max(next_at, time.monotonic()) + period_s
        action = FAULTS[number % len(FAULTS)]
        try:
            what = soak.fault(action, rng, STOP_S, shutdown)
        except Exception as error:  # reported in the verdict; the run goes on
            errors.append(f"{action}: {type(error).__name__}: {error}")
            what = f"ERROR {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(f"[{(time.monotonic() - began) / 60:5.1f} min] fault {action}: {what}", flush=True)


def minute_line(soak: SoakSwarm, tally: Tally, began: float, samples: dict[str, list[tuple[float, Usage]]]) -> str:
    """Generations so far and each peer's RSS / threads / fds; keeps the samples for the RSS report."""
    minutes = (time.monotonic() - began) / 60
    parts = []
    for peer in soak.swarm.peers:
        state, base = soak.status(peer), soak.baselines.get(peer.name)
        if state == "up" and (base is None or base.pid != peer.process.pid):
            state = "starting"  # restarted, not ready yet: its RSS would read as growth
        usage = proc_usage(peer.process.pid) if state == "up" else None
        if usage is None:
            parts.append(f"{soak.label(peer)} {state if state != 'up' else 'down'}")
            continue
        samples.setdefault(peer.name, []).append((minutes, usage))
        parts.append(f"{soak.label(peer)} {usage.rss_mib:.0f}M/{usage.threads}t/{usage.fds}fd")
    with tally.lock:
        done = f"completed {tally.completed} identical {tally.identical} failed {tally.failed}"
    return f"[{minutes:5.1f} min] {done} | " + "  ".join(parts)


def leak_report(soak: SoakSwarm) -> list[str]:
    """Per peer: sessions, pages, tasks, threads and fds now against its baseline; returns the leaks."""
    leaks = []
    for peer in soak.swarm.peers:
        base, now = soak.baselines.get(peer.name), peer_usage(peer)
        if base is None or now is None or base.pid != now.pid:
            leaks.append(f"{soak.label(peer)}: no baseline or not running")
            continue
        print(f"  {soak.label(peer)} pid {now.pid}: sessions {now.sessions}, pages in use {now.used_pages}, "
              f"state {now.state}; tasks {base.tasks} -> {now.tasks}, threads {base.threads} -> {now.threads}, "
              f"fds {base.fds} -> {now.fds}")
        leaks += [f"{soak.label(peer)}: {what}" for what, bad in (
            (f"{now.sessions} open sessions", now.sessions != 0),
            (f"{now.used_pages} cache pages in use", now.used_pages != 0),
            (f"state {now.state!r}", now.state != "online"),
            *((f"{name} {getattr(base, name)} -> {getattr(now, name)} (slack {slack})",
               getattr(now, name) > getattr(base, name) + slack) for name, slack in SLACK.items()),
        ) if bad]
    return leaks


def rss_report(soak: SoakSwarm, samples: dict[str, list[tuple[float, Usage]]]) -> list[str]:
    """First against last minute sample of each peer's current incarnation; returns the ones that grew."""
    grown = []
    factor, extra = RSS_GROWTH
    for peer in soak.swarm.peers:
        mine = [(minute, usage) for minute, usage in samples.get(peer.name, []) if usage.pid == peer.process.pid]
        if not mine:
            print(f"  {soak.label(peer)}: no minute sample of its current incarnation")
            continue
        (first_min, first), (last_min, last) = mine[0], mine[-1]
        print(f"  {soak.label(peer)} pid {last.pid}: {first.rss_mib:.0f} MiB at {first_min:.1f} min -> "
              f"{last.rss_mib:.0f} MiB at {last_min:.1f} min ({last.rss_mib - first.rss_mib:+.0f} MiB)")
        if last_min - first_min >= 10 and last.rss_mib > first.rss_mib * factor + extra:
            grown.append(f"{soak.label(peer)}: RSS {first.rss_mib:.0f} -> {last.rss_mib:.0f} MiB")
    return grown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--peers", type=int, default=len(SPANS), choices=[len(SPANS)],
                        help="peers in the swarm (the layout is fixed at six)")
    parser.add_argument("--fault-period", type=float, default=30.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=0, help="prompts, lengths and victims")
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.fault_period <= STOP_S:
        parser.error(f"--fault-period must be longer than a stopped peer's {STOP_S:.0f} s")
    torch.set_num_threads(1)  # the reference model shares the cores with six peers
    rng = random.Random(args.seed)
    peer_args = [*FAST_PEER_ARGS, "--session-idle-timeout", str(IDLE_TIMEOUT_S)]
    client_options: dict[str, object] = {}
    if args.batch_invariant:
        peer_args.append("--batch-invariant")
        client_options["batch_invariant"] = True

    with tempfile.TemporaryDirectory(prefix="brigade-soak-") as tmp:
        folder = Path(tmp)
        reference = build_model("llama", 0, **SHAPE)  # a fixed seed: the same checkpoint every run
        assert_tokens_vary(reference)
        reference.save_pretrained(folder / "soak-llama")
        references = References(reference)
        prompts = [tuple(rng.randrange(SHAPE["vocab_size"]) for _ in range(
            rng.randint(4, 32) if rng.random() < 0.85 else rng.randint(129, 200)))  # some cross prefill chunks
            for _ in range(PROMPTS)]
        soak = SoakSwarm(folder, folder / "soak-llama", SPANS, peer_args)
        models: list[DistributedModelForCausalLM] = []
        try:
            soak.start()
            threads_before = {thread.ident for thread in threading.enumerate()}
            models = [DistributedModelForCausalLM.from_pretrained(str(folder / "soak-llama"),
                                                                  soak.swarm.initial_peers, **client_options)
                      for _ in range(args.clients)]
            tally, stop_clients, stop_faults, errors = Tally(), threading.Event(), threading.Event(), []
            began = time.monotonic()
            clients = [threading.Thread(target=client_loop, name=f"client-{index}", args=(
                index, model, prompts, references, tally, random.Random(f"{args.seed}-{index}"), stop_clients))
                for index, model in enumerate(models)]
            faults = threading.Thread(target=fault_loop, name="faults", args=(
                soak, args.fault_period, random.Random(f"{args.seed}-faults"), stop_faults, began, errors))
            for thread in [*clients, faults]:
                thread.start()
            samples: dict[str, list[tuple[float, Usage]]] = {}
            dumped: set[int] = set()
            end = began + args.minutes * 60
            for minute in itertools.count(1):
                wait_until(min(began + minute * 60, end))
                print(minute_line(soak, tally, began, samples), flush=True)
                long_running = [index for index, since in list(tally.running_since.items())
                                if time.monotonic() - since > STUCK_S and index not in dumped]
                if long_running:  # where it waits, while the swarm is still as it was
                    dumped.update(long_running)
                    dump_stuck([clients[index] for index in long_running], [models[index] for index in long_running])
                if time.monotonic() >= end:
                    break

            print("\nstopping faults, healing the swarm, closing the clients", flush=True)
            stop_faults.set()
            faults.join()
            soak.restart_all()
            stop_clients.set()
            for thread in clients:
                thread.join(300)
            stuck = [thread.name for thread in clients if thread.is_alive()]
            if stuck:
                dump_stuck([thread for thread in clients if thread.is_alive()], models)
            for model in models:
                model.close()
            models = []
            print(f"waiting out the peers' session idle timeout ({IDLE_TIMEOUT_S:.0f} s)", flush=True)
            time.sleep(IDLE_TIMEOUT_S + 5)
            print(minute_line(soak, tally, began, samples))
            print(f"\nleaks per peer (slack over the count after its (re)start: {SLACK}):")
            leaks = leak_report(soak)
            leaks += [f"stale process {what}" for what in soak.stale_groups()]
            leaks += [f"{peer}: still running {DRAIN_EXIT_S:.0f} s after SIGTERM" for peer in soak.hung_drains]
            left = [thread.name for thread in threading.enumerate() if thread.ident not in threads_before]
            print(f"this process: {len(left)} threads more than before the clients: {', '.join(left) or 'none'}")
            if len(left) > CLIENT_THREAD_SLACK:
                leaks.append(f"this process: {len(left)} threads left after closing the clients")
            print("\npeer RSS, first minute (or restart) -> last minute:")
            leaks += rss_report(soak, samples)
            leaks += [f"client thread {name} still running" for name in stuck]
            for leak in leaks:
                print(f"LEAK {leak}")
            for error in errors:
                print(f"FAULT ERROR {error}")
            generations = tally.completed + tally.failed
            ok = tally.failed == 0 and tally.identical == tally.completed > 0 and not leaks and not errors
            print(f"\n{'PASS' if ok else 'FAIL'}: {args.minutes:g} min, {args.clients} clients, "
                  f"{len(soak.swarm.peers)} peers, a fault every {args.fault_period:g} s "
                  f"(batch-invariant {'on' if args.batch_invariant else 'off'}): {generations} generations, "
                  f"identical {tally.identical}, failed {tally.failed}, differed "
                  f"{tally.completed - tally.identical}; {len(leaks)} leaks, {len(errors)} fault errors "
                  f"({references.ties()} of {PROMPTS} prompts skipped as near ties)", flush=True)
            return 0 if ok else 1
        finally:
            for model in models:
                model.close()
            soak.swarm.close()


if __name__ == "__main__":
    sys.exit(main())
