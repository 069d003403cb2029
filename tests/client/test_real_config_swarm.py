"""Every published config of tests/fixtures/configs, served by real peer processes, matches transformers.

For each config: a tiny checkpoint with the published config.json (sizes shrunk), two or three peer
processes splitting its layers where layers of different kinds meet (sliding and global layers,
local and global rotary settings), and a client generating 24 greedy tokens through them. The
prompt is longer than every sliding window the config has, and for a scaled rope it ends just
before the switch length (LongRoPE's and llama3's original length, dynamic NTK's max positions),
so generation runs past it: a LongRoPE or dynamic session changes tables mid-generation, as
transformers does. Then one stateless forward over the whole sequence (a single call longer than
the switch) is compared as logits.

Every config's peers join one bootstrap node shared with the rest of the suite; each config gets
its own peers, stopped before the next config starts. Logit tolerance: ``assert_logits_close``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from brigade_configs import NAMES, NEW_TOKENS, RealConfig, assert_logits_close, build_checkpoint, prompt, reference
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm

# Routing is not what these tests look at: announce a fixed throughput instead of measuring each span.
PEER_ARGS = [*FAST_PEER_ARGS, "--throughput", "500", "--client-cache-share", "1"]
PROMPT_SEEDS = range(8)


@pytest.fixture(scope="module", params=NAMES)
def served(request: pytest.FixtureRequest, shared_bootstrap: list[str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    real = RealConfig.load(request.param)
    folder = tmp_path_factory.mktemp(real.name)
    checkpoint = build_checkpoint(real, folder / "checkpoint")
    swarm = LocalSwarm(folder / "swarm", peer_threads=PEER_THREADS)
    swarm.initial_peers = shared_bootstrap  # closing this swarm stops only its peers
    length = real.max_length() + 8
    args = [*PEER_ARGS, "--max-session-length", str(length), "--cache-tokens", str(8 * length)]
    try:
        for span in real.spans():
            swarm.add_peer(str(checkpoint), span, extra_args=args, wait=False)
        for peer in swarm.peers:
            swarm.wait_ready(peer)
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), shared_bootstrap) as model:
            yield real, reference(checkpoint), model
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def expected(served: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt and transformers' greedy continuation of it: what the swarm must produce.

    Random weights over a long prompt can settle into repeating one token: the first prompt seed
    whose 24 tokens vary (and do not stop at EOS) is used, so the comparison means something.
    """
    real, model, _ = served
    for seed in PROMPT_SEEDS:
        ids = prompt(real, seed=seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        if len(new) == NEW_TOKENS and len(set(new)) >= NEW_TOKENS // 3:
            return ids, out
    raise AssertionError(f"{real.name}: no prompt seed in {PROMPT_SEEDS} gives varying reference tokens")


def test_greedy_tokens_through_real_peers_match_transformers(served: tuple, expected: tuple) -> None:
    """Where the rotary table depends on the length (dynamic NTK, LongRoPE), speculative decoding too:
    each round is one call, but its positions carry the call lengths plain decoding gives them (and
    Phi-3's recompute at its switch), so a draft changes no token, past the switch included."""
    real, reference_model, model = served
    ids, want = expected
    got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.tolist() == want.tolist()
    assert len(model.last_route) == len(real.spans())
    if model.head.args.rope_by_length:
        got = model.generate(ids, max_new_tokens=NEW_TOKENS, draft_model=reference_model, draft_tokens=4)
        assert got.tolist() == want.tolist()
        assert model.last_speculation is not None and model.last_speculation.accepted > 0


def test_logits_of_the_whole_sequence_match_transformers(served: tuple, expected: tuple) -> None:
    _, reference_model, model = served
    sequence = expected[1]
    with torch.no_grad():
        want = reference_model(sequence).logits
    assert_logits_close(model(sequence).logits, want)

