"""nf4 and int8 peers serve; through the swarm they give exactly what the same quantized layers give locally.

Error against the unquantized model is measured on the embedded default model (trained weights,
so the figure means something; random weights at a large init scale amplify any perturbation).
Bounds, as a share of the unquantized logits' standard deviation: int8 (per-row scales, 256
levels) under 1%; nf4 (16 levels per 64-weight block) under 5%. Measured here: 0.14% and 1.5%.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from brigade_testkit import PEER_THREADS

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm
from brigade.kernels.cache import KVCache
from brigade.kernels.default_model import DEFAULT_MODEL_DIR
from brigade.kernels.loading import load_head, load_span
from brigade.kernels.quant import quantize_span

MODEL = str(DEFAULT_MODEL_DIR)
PROMPT = torch.tensor([[5, 17, 300, 41, 9, 1000, 77]])
ERROR_BOUNDS = {"int8": 0.01, "nf4": 0.05}


def local_greedy(kind: str, new_tokens: int) -> list[int]:
    """Greedy decoding with the same quantized layers in this process: the reference for parity."""
    head = load_head(MODEL)
    span = quantize_span(load_span(MODEL, 0, 6), kind)
    cache = KVCache.allocate(0, 6, 1, span.args.num_kv_heads, span.args.head_dim, 64, torch.float32)
    pads = torch.zeros(1, dtype=torch.long)
    tokens = PROMPT[0].tolist()
    hidden = head.embed(PROMPT)
    for _ in range(new_tokens):
        token = int(head.logits(span(hidden, pads, cache)[:, -1]).argmax(-1))
        tokens.append(token)
        hidden = head.embed(torch.tensor([[token]]))
    return tokens


@pytest.fixture(scope="module")
def quantized_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    swarm = LocalSwarm(tmp_path_factory.mktemp("quantized"), peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        for layers, kind in [((0, 3), "nf4"), ((3, 6), "nf4"), ((0, 6), "int8")]:
            swarm.add_peer(MODEL, layers, extra_args=["--quant", kind, "--drain-grace", "1"], wait=False)
        for peer in swarm.peers:
            swarm.wait_ready(peer)
        yield swarm
    finally:
        swarm.close()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_peers_match_local_quantized_layers(quantized_swarm: LocalSwarm, kind: str) -> None:
    with DistributedModelForCausalLM.from_pretrained(
        MODEL, quantized_swarm.initial_peers, quantizations=(kind,)
    ) as model:
        got = model.generate(PROMPT, max_new_tokens=24, do_sample=False)[0].tolist()
        hops = len(model.last_route)
    assert got == local_greedy(kind, 24)
    assert hops == (2 if kind == "nf4" else 1)  # the client kept to peers of the asked quantization


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantization_error_against_the_unquantized_model(kind: str) -> None:
    head = load_head(MODEL)
    pads = torch.zeros(1, dtype=torch.long)
    exact = head.logits(load_span(MODEL, 0, 6)(head.embed(PROMPT), pads))
    quantized = head.logits(quantize_span(load_span(MODEL, 0, 6), kind)(head.embed(PROMPT), pads))
    relative = (quantized - exact).abs().mean() / exact.std()
    assert relative < ERROR_BOUNDS[kind], f"{kind}: mean abs logit error is {relative:.2%} of the logits' std"
