"""The testbed's client: runs inside the client host, generates once, prints one result line.

``python -m brigade.deploy.testbed.client MODEL --initial-peers MADDR --prompt-ids 1,2,3``

A mode is how tokens travel through the pipeline: ``client`` is client-driven (the client calls
each hop in turn: one round trip per hop per token), ``forwarding`` (the library's default) has
each peer send its output straight to the next peer (one trip per hop plus one back), and
``speculative`` is forwarding plus a local draft model (``--draft-model``) whose tokens the swarm
checks several per step. Every mode has the same signature; the testbed and ``benchmarks/wan.py``
pass ``--mode`` through unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

RESULT_MARK = "BRIGADE_TESTBED_RESULT"
PROGRESS_MARK = "BRIGADE_TESTBED_TOKEN"  # with --progress: one line per token as it arrives (index, seconds)


@dataclass
class ClientRun:
    tokens: list[int]  # new tokens only, batch of one
    token_times_s: list[float]  # when each new token arrived, from the start of the generation
    route: list[str]  # "peer_id[start:end]" per hop, as the client used it
    speculation: dict[str, float] | None = None  # the speculative mode's acceptance and steps
    compute_ms: float | None = None  # the peers' compute per token (Info.compute_seconds; prefill spread in)


_progress = False  # set by --progress


def report_progress(index: int, seconds: float) -> None:
    """One line per token, so a test can act mid-generation (kill a peer after the N-th token)."""
    if _progress:
        print(f"{PROGRESS_MARK} {index} {seconds:.3f}", flush=True)


def peers_compute_s(distributed: Any) -> float:
    """Seconds every peer of the model has spent computing so far (peers that do not answer count 0)."""
    from brigade.protocol import brigade_pb2 as pb

    async def total() -> float:
        seconds = 0.0
        for record in await distributed.swarm.records(0.0):
            try:
                info = await distributed.swarm.stub(record).Info(pb.InfoRequest(), timeout=5)
            except Exception:  # a peer that went away: its compute is not this run's
                continue
            seconds += info.compute_seconds
        return seconds

    return distributed._loop.run(total(), 60)


def _greedy(model: str, initial_peers: list[str], prompt_ids: list[int], new_tokens: int,
            **client_options: object) -> ClientRun:
    """Greedy decoding through ``DistributedModelForCausalLM`` with the given client options."""
    import torch

    from brigade.client import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(model, initial_peers, **client_options) as distributed:
        input_ids = torch.tensor([prompt_ids])
        tokens, times = [], []
        computed_before = peers_compute_s(distributed)
        began = time.perf_counter()
        for step in distributed.stream(input_ids, max_new_tokens=new_tokens, do_sample=False):
            times.append(time.perf_counter() - began)
            tokens.append(int(step[0]))
            report_progress(len(tokens), times[-1])
        compute_ms = 1000 * (peers_compute_s(distributed) - computed_before) / max(1, len(tokens))
        return ClientRun(tokens, times, list(distributed.last_route), compute_ms=compute_ms)


def client_driven(model: str, initial_peers: list[str], prompt_ids: list[int], new_tokens: int) -> ClientRun:
    """The client calls each hop in turn."""
    return _greedy(model, initial_peers, prompt_ids, new_tokens, forwarding=False)


def forwarding(model: str, initial_peers: list[str], prompt_ids: list[int], new_tokens: int) -> ClientRun:
    """Each peer sends its output straight to the next; the last answers the client."""
    return _greedy(model, initial_peers, prompt_ids, new_tokens, forwarding=True)


def speculative(model: str, initial_peers: list[str], prompt_ids: list[int], new_tokens: int,
                draft_model: str | None = None) -> ClientRun:
    """Forwarding plus a local draft (``--draft-model``) whose tokens the swarm checks several per step."""
    import torch
    from transformers import AutoModelForCausalLM

    from brigade.client import DistributedModelForCausalLM

    if not draft_model:
        raise SystemExit("the speculative mode needs --draft-model")
    draft = AutoModelForCausalLM.from_pretrained(draft_model)  # loaded before the clock starts
    with DistributedModelForCausalLM.from_pretrained(model, initial_peers, forwarding=True) as distributed:
        input_ids = torch.tensor([prompt_ids])
        tokens, times = [], []
        computed_before = peers_compute_s(distributed)
        began = time.perf_counter()
        for step in distributed.stream(input_ids, max_new_tokens=new_tokens, do_sample=False, draft_model=draft):
            times.append(time.perf_counter() - began)
            tokens.append(int(step[0]))
        compute_ms = 1000 * (peers_compute_s(distributed) - computed_before) / max(1, len(tokens))
        stats = distributed.last_speculation
        assert stats is not None
        drafted = max(1, stats.drafted)
        later = [r.draft_ms + r.step_ms for r in stats.rounds[1:]] or [float("nan")]
        summary = {"acceptance_rate": stats.accepted / drafted, "draft_agreement": stats.draft_agreement,
                   "tokens_per_step": stats.tokens_per_step,
                   "steps": len(stats.rounds), "mean_k": stats.drafted / max(1, len(stats.rounds)),
                   "draft_ms_per_token": sum(r.draft_ms for r in stats.rounds) / drafted,
                   "first_step_tokens": stats.rounds[0].accepted + 1,  # came with the first token
                   "median_round_ms": statistics.median(later)}  # draft + step, after the first
        return ClientRun(tokens, times, list(distributed.last_route), summary, compute_ms)


Mode = Callable[..., ClientRun]  # (model, initial_peers, prompt_ids, new_tokens, **mode options) -> ClientRun
MODES: dict[str, Mode] = {"client": client_driven, "forwarding": forwarding, "speculative": speculative}
# How many one-way trips a decode step pays per hop: 2 when the client calls each hop, 1 (plus one
# back from the last hop) when peers forward. Modes built on forwarding (speculation) add theirs.
FORWARDING_MODES = {"forwarding", "speculative"}


def prompt_to_ids(model: str, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    from brigade.kernels.checkpoint import resolve_config_folder

    return list(AutoTokenizer.from_pretrained(resolve_config_folder(model))(prompt).input_ids)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from brigade.peer.lifetime import children_die_with_this_process

    children_die_with_this_process()  # hivemind's DHT child and its p2pd go when this process goes
    parser = argparse.ArgumentParser(description="Generate once through the testbed and print the result.")
    parser.add_argument("model")
    parser.add_argument("--initial-peers", action="append", required=True)
    parser.add_argument("--prompt-ids", help="comma-separated token ids")
    parser.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--mode", choices=sorted(MODES), default="forwarding")
    parser.add_argument("--progress", action="store_true", help="print a line per token as it arrives")
    parser.add_argument("--draft-model", help="draft checkpoint folder (the speculative mode)")
    options = parser.parse_args(argv)
    global _progress
    _progress = options.progress
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if options.prompt_ids:
        prompt_ids = [int(token) for token in options.prompt_ids.split(",")]
    elif options.prompt is not None:
        prompt_ids = prompt_to_ids(options.model, options.prompt)
    else:
        parser.error("give --prompt-ids or --prompt")
    extra = {}
    if options.draft_model:
        if options.mode != "speculative":
            parser.error("--draft-model goes with --mode speculative")
        extra["draft_model"] = options.draft_model
    run = MODES[options.mode](options.model, options.initial_peers, prompt_ids, options.new_tokens, **extra)
    print(f"{RESULT_MARK} {json.dumps({'prompt_ids': prompt_ids, 'mode': options.mode, **asdict(run)})}", flush=True)


if __name__ == "__main__":
    main()
