"""Generation through a real swarm matches transformers, for every supported family.

One bootstrap DHT node serves the whole suite (``shared_bootstrap``); each family gets four peer processes on
loopback, splitting its 6 layers at 2, 3 and 4 (for Gemma 2 and 3 both sliding-to-global and
global-to-sliding cuts; Gemma 3's 2:3 and 3:4 are all-sliding spans with bounded caches). The
prompts (24, 20 and 8 tokens) are longer than the windowed models' window (8) and the first two
longer than their ring (15 slots), so prefill, decode and wrap-around all happen on bounded caches.

Logit tolerance: fp32 on CPU, atol 1e-4 / rtol 1e-4 (the peers and transformers differ only in
summation order; observed differences are around 1e-5 on logits of magnitude ~2-10).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from brigade_testkit import FAMILIES, FAST_PEER_ARGS, PEER_THREADS, build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm

NEW_TOKENS = 32
SPANS = [(0, 2), (2, 3), (3, 4), (4, 6)]  # three cuts


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_setup(
    request: pytest.FixtureRequest, shared_bootstrap: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple]:
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    checkpoint = build_checkpoint(folder / f"tiny-{family}", family, seed=7)
    reference = build_model(family, seed=7)
    swarm = LocalSwarm(folder / "swarm", peer_threads=PEER_THREADS)
    swarm.initial_peers = shared_bootstrap  # peers join the shared node; closing this swarm stops only them
    try:
        for span in SPANS:
            swarm.add_peer(str(checkpoint), span, extra_args=FAST_PEER_ARGS, wait=False)
        for peer in swarm.peers:
            swarm.wait_ready(peer)
        model = DistributedModelForCausalLM.from_pretrained(str(checkpoint), shared_bootstrap)
        try:
            yield family, reference, model
        finally:
            model.close()
    finally:
        swarm.close()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 24, 20 and 8, left-padded into one batch."""
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 512, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :16] = 0
    return ids, mask


PADS = (0, 4, 16)


def test_greedy_single_prompt_matches_transformers(family_setup: tuple) -> None:
    _, reference, model = family_setup
    ids = prompts()[0][:1]
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(set(expected[0, ids.shape[1] :].tolist())) > NEW_TOKENS // 4, "reference tokens must vary"
    got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert len(model.last_route) == len(SPANS)


def test_greedy_batch_of_different_lengths_matches_transformers(family_setup: tuple) -> None:
    _, reference, model = family_setup
    ids, mask = prompts()
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_forward_logits_match_within_tolerance(family_setup: tuple) -> None:
    _, reference, model = family_setup
    ids, mask = prompts()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask).logits
    for row, pad in enumerate(PADS):
        torch.testing.assert_close(got[row, pad:], expected[row, pad:], atol=1e-4, rtol=1e-4)


def test_sampling_with_a_seed_matches_local_sampling(family_setup: tuple) -> None:
    _, reference, model = family_setup
    ids, mask = prompts()
    options = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    torch.manual_seed(1234)
    expected = reference.generate(ids, attention_mask=mask, **options)
    torch.manual_seed(1234)
    got = model.generate(ids, attention_mask=mask, **options)
    assert got.tolist() == expected.tolist()
