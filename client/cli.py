"""`brigade generate`: stream text from a model served by the swarm."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer


def generate(
    model: Annotated[str, typer.Argument(help="Local checkpoint folder or Hugging Face repo id.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    initial_peers: Annotated[list[str], typer.Option("--initial-peers", help="DHT multiaddr(s) to join.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    do_sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Name in the DHT (default: repo id or folder name).")] = None,
    draft_model: Annotated[str | None, typer.Option(
        help="Small local model with the same tokenizer (folder or repo id): speculative decoding.")] = None,
    draft_tokens: Annotated[int | None, typer.Option(
        help="Drafted tokens per step with --draft-model (default: adapted to acceptance and step time).")] = None,
    allow_peers: Annotated[str | None, typer.Option(
        help="File of peer ids, one per line: route only through these peers (a private swarm).")] = None,
    block_peers: Annotated[str | None, typer.Option(
        help="File of peer ids, one per line: never route through these peers.")] = None,
    identity: Annotated[str | None, typer.Option(
        help="Ed25519 key file of this client (created on first run; default: a fresh key).")] = None,
) -> None:
    """Generate a continuation of PROMPT through the swarm, streaming tokens as they come."""
    from brigade.routing.peer_filter import PeerFilter

    try:
        peer_filter = PeerFilter.from_files(allow_peers, block_peers)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    run_generation(model, prompt, list(initial_peers), max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, model_name=model_name,
                   draft_model=draft_model, draft_tokens=draft_tokens,
                   allowed_peers=peer_filter.allow, blocked_peers=peer_filter.block, identity_path=identity)


def run_generation(model: str, prompt: str, initial_peers: list[str], *, max_new_tokens: int = 64,
                   do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None, model_name: str | None = None,
                   draft_model: str | None = None, draft_tokens: int | None = None,
                   allowed_peers: frozenset[str] | None = None, blocked_peers: frozenset[str] = frozenset(),
                   identity_path: str | None = None) -> str:
    """Streams the continuation to stdout and prints tokens/s and the route; returns the text."""
    import torch
    from transformers import AutoTokenizer

    from brigade.client import DistributedModelForCausalLM
    from brigade.kernels.checkpoint import resolve_config_folder

    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_config_folder(model))
    options: dict[str, object] = {"model_name": model_name} if model_name else {}
    options.update(allowed_peers=allowed_peers, blocked_peers=blocked_peers, identity_path=identity_path)
    with DistributedModelForCausalLM.from_pretrained(model, initial_peers, **options) as distributed:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        sys.stdout.write(prompt)
        sys.stdout.flush()
        new_tokens: list[int] = []
        printed = ""
        began = time.perf_counter()
        first_token_s = None
        for tokens in distributed.stream(input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                         draft_model=draft_model, draft_tokens=draft_tokens):
            first_token_s = first_token_s or time.perf_counter() - began
            new_tokens.append(int(tokens[0]))
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
        seconds = time.perf_counter() - began
        route = " -> ".join(distributed.last_route)
        speculation = distributed.last_speculation
    decode_rate = (len(new_tokens) - 1) / (seconds - first_token_s) if len(new_tokens) > 1 and first_token_s else 0.0
    print(f"\n\n{len(new_tokens)} tokens in {seconds:.2f} s: {decode_rate:.1f} tokens/s after the first "
          f"(first token {1000 * (first_token_s or 0):.0f} ms)")
    print(f"route: {route}")
    if speculation is not None and speculation.rounds:
        print(f"speculation: {speculation.acceptance_rate:.0%} of {speculation.drafted} drafted tokens accepted "
              f"(the draft was right on {speculation.draft_agreement:.0%} of those checked), "
              f"{speculation.tokens_per_step:.2f} tokens per step over {len(speculation.rounds)} steps")
    return printed
