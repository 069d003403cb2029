"""`brigade demo`: a whole swarm on this machine, generating text, then gone.

Starts a bootstrap DHT node and three peers (separate processes on 127.0.0.1) that split the
model's layers, streams a generation through them, checks it against plain transformers on the
same checkpoint, and stops every process it started.
"""

from __future__ import annotations

from typing import Annotated

import typer


def split_layers(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Consecutive spans of near-equal size covering [0, num_layers)."""
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


def demo(
    model: Annotated[str | None, typer.Argument(help="Checkpoint folder (default: the embedded tiny model).")] = None,
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "import os\n",
    peers: Annotated[int, typer.Option(help="Peers to start, each on its own span.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    greedy: Annotated[bool, typer.Option(help="Greedy decoding instead of seeded sampling.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed (the local check reuses it).")] = 0,
) -> None:
    """Run a local swarm on MODEL (or the embedded default), generate through it, stop it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from brigade.client.cli import run_generation
    from brigade.deploy.launcher import LocalSwarm
    from brigade.kernels.default_model import DEFAULT_MODEL_DIR
    from brigade.kernels.loading import load_config

    model = model or str(DEFAULT_MODEL_DIR)
    num_layers = load_config(model).num_hidden_layers
    spans = split_layers(num_layers, peers)
    with LocalSwarm() as swarm:
        print(f"starting a bootstrap DHT node and {len(spans)} peers on 127.0.0.1 (logs in {swarm.log_dir})")
        swarm.start_bootstrap()
        launched = [swarm.add_peer(model, span, extra_args=["--drain-grace", "2"], wait=False) for span in spans]
        for span, peer in zip(spans, launched, strict=True):
            info = swarm.wait_ready(peer)
            print(f"  peer {info['peer_id']} serves layers {span[0]}:{span[1]} at {info['address']}")
        print()
        # A tiny model loops under greedy decoding; seeded sampling reads better and is just as checkable.
        sampling = {} if greedy else {"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.95}
        text = run_generation(model, prompt, swarm.initial_peers, max_new_tokens=max_new_tokens, seed=seed,
                              **sampling)
        print("stopping the swarm")
    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.no_grad():
        expected = reference.generate(input_ids, max_new_tokens=max_new_tokens, **(sampling or {"do_sample": False}))
    expected_text = tokenizer.decode(expected[0, input_ids.shape[1]:], skip_special_tokens=True)
    same = expected_text == text
    how = "greedy" if greedy else f"sampling, seed {seed}"
    print(f"same text as local transformers generate ({how}): {'yes' if same else 'NO'}")
    if not same:
        raise typer.Exit(1)
