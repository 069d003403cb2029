"""Speculative decoding: greedy tokens identical with and without a draft, exact sampling, adaptive k.

The decoding logic is first driven against the whole tiny model held locally behind the session's
step contract (``LocalSession``: a step starting below the length rolls the cache back), which
checks batches, left padding, EOS and many draft lengths in milliseconds. Then the same decoder
goes through the shared real swarm (three peer processes on loopback), where the peers' caches
must roll back for the tokens to stay right, and each peer's reported session length is checked
after every step.

The draft is the test model with its decoder weights perturbed by 3% noise: it agrees with the
model on roughly half the positions, so every run both accepts and rejects drafts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from brigade_testkit import build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.client.decoding import GenerationOptions, StepReport
from brigade.client.sampling import SamplingParams, TokenChooser
from brigade.client.session import InferenceSession
from brigade.client.speculative import (
    AdaptiveK,
    DraftVocabularyError,
    SpeculationStats,
    cache_argument,
    check_vocabulary,
    speculative_decoder,
    verify,
)
from brigade.deploy.launcher import LocalSwarm

VOCAB = 512  # the test models' vocabulary (brigade_testkit.TINY_SHAPE)
NEW_TOKENS = 24


def perturbed_draft(scale: float = 0.03, seed: int = 1) -> torch.nn.Module:
    """The test model with noise of ``scale`` times each decoder weight's spread: right sometimes."""
    draft = build_model("llama", seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in draft.named_parameters():
            if ".layers." in name:
                weight.add_(torch.randn(weight.shape, generator=generator) * scale * weight.std())
    return draft


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    return ids, mask


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return build_model("llama", seed=0)


@pytest.fixture(scope="module")
def draft() -> torch.nn.Module:
    return perturbed_draft()


# -- the decoder against the model held locally ---------------------------------------------------------
class TokenHead:
    """A head whose hidden states are the token ids themselves; ``LocalSession`` turns them into logits."""

    args = SimpleNamespace(vocab_size=VOCAB, recompute_at=lambda: None, rope_by_length=False)  # as a Llama's

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[..., None].float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float()


class LocalSession:
    """The whole model behind ``InferenceSession.step``'s contract: a start below the length rolls back."""

    def __init__(self, model: torch.nn.Module, pads: list[int]):
        self.model = model
        self.pads = torch.tensor(pads)
        self.cache = None
        self.position = 0

    @torch.inference_mode()
    def step(self, hidden: torch.Tensor, start: int | None) -> torch.Tensor:
        start = self.position if start is None else start
        assert 0 <= start <= self.position
        if start < self.position:
            self.cache.crop(start - self.position)
        ids = hidden[..., 0].long()
        total = start + ids.shape[1]
        mask = (torch.arange(total)[None] >= self.pads[:, None]).long()
        positions = (torch.arange(start, total)[None] - self.pads[:, None]).clamp(min=0)
        argument = cache_argument(self.model)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{argument: self.cache})
        self.cache, self.position = out[argument], total
        return out.logits  # [B, T, V]: TokenHead.logits passes them through


def run_locally(model: torch.nn.Module, draft: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, *,
                draft_tokens: int | None = None, step_s: float = 0.05, **generation: object,
                ) -> tuple[torch.Tensor, SpeculationStats]:
    pads = (mask == 0).sum(dim=1).tolist()
    options = GenerationOptions.resolve(model.generation_config, **generation)
    choose = TokenChooser(options.params, torch.Generator().manual_seed(0))
    decoder, stats = speculative_decoder(TokenHead(), choose, ids, options, pads, draft, draft_tokens)
    session = LocalSession(model, pads)
    tokens, step = [], decoder.first()
    while step is not None:
        out = session.step(step.hidden, step.start)
        tokens += decoder.accept(out, StepReport(step_s, session.position, ()))
        step = decoder.next()
    return torch.cat([ids, torch.stack(tokens, dim=1)], dim=1), stats


@pytest.mark.parametrize("draft_tokens", [None, 1, 3, 16])
def test_greedy_tokens_are_plain_greedy_for_left_padded_batches_with_eos(reference, draft, draft_tokens) -> None:
    ids, mask = left_padded_prompts()
    free_run = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    eos = int(free_run[0, ids.shape[1] + 6])  # the first row stops early, the others run on
    for options in (dict(), dict(eos_token_id=eos, pad_token_id=0)):
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                      **options)
        got, stats = run_locally(reference, draft, ids, mask, draft_tokens=draft_tokens,
                                 max_new_tokens=NEW_TOKENS, do_sample=False, **options)
        assert got.tolist() == expected.tolist()
        assert 0 < stats.acceptance_rate < 1


def test_perfect_and_hopeless_drafts_give_the_same_tokens(reference) -> None:
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    # With a perfect draft, a swarm step (simulated, never slept) costing far more than drafting a token,
    # as over a network: k then grows with acceptance whatever load this machine puts on the draft.
    perfect, perfect_stats = run_locally(reference, reference, ids, mask, max_new_tokens=NEW_TOKENS, step_s=1.0)
    hopeless, hopeless_stats = run_locally(reference, build_model("llama", seed=1), ids, mask,
                                           max_new_tokens=NEW_TOKENS)
    assert perfect.tolist() == expected.tolist() == hopeless.tolist()
    assert perfect_stats.acceptance_rate == 1.0 and len(perfect_stats.rounds) < NEW_TOKENS // 4
    assert hopeless_stats.acceptance_rate < 0.2
    assert {record.drafted for record in hopeless_stats.rounds[3:-1]} == {1}, "k falls to 1 with a useless draft"


def test_max_new_tokens_is_exact_and_a_single_token_needs_no_draft(reference, draft) -> None:
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for new_tokens in (1, 2, 5, 17):
        got, _ = run_locally(reference, draft, ids, mask, draft_tokens=16, max_new_tokens=new_tokens)
        assert got.shape[1] == 7 + new_tokens
        assert got.tolist() == reference.generate(ids, max_new_tokens=new_tokens, do_sample=False).tolist()
    _, single = run_locally(reference, draft, ids, mask, max_new_tokens=1)
    assert [record.drafted for record in single.rounds] == [0]


def test_sampling_with_the_model_as_its_own_draft_accepts_everything(reference) -> None:
    ids, mask = left_padded_prompts()
    got, stats = run_locally(reference, reference, ids, mask, max_new_tokens=NEW_TOKENS, do_sample=True,
                             temperature=0.8, top_k=50, top_p=0.95)
    assert got.shape == (3, ids.shape[1] + NEW_TOKENS)
    assert stats.acceptance_rate > 0.99  # p == q up to rounding: nothing is rejected


# -- the acceptance rule --------------------------------------------------------------------------------
def test_speculative_sampling_draws_from_the_models_distribution() -> None:
    """Many rows at once: the token settled at each position follows p, whatever q proposed."""
    rows = 40_000
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    p1 = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    q0 = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])  # a poor draft: over-proposes token 1
    generator = torch.Generator().manual_seed(0)
    choose = TokenChooser(SamplingParams(do_sample=True), generator)
    drafts = torch.multinomial(q0, rows, replacement=True, generator=generator)[:, None]  # [rows, 1]
    logits = torch.stack([p0.log(), p1.log()])[None].expand(rows, 2, 5)
    verdict = verify(drafts, logits, choose, torch.zeros(rows, 1, dtype=torch.long),
                     q0[None, None].expand(rows, 1, 5))
    kept = verdict.first_rejected == 1
    first_token = torch.where(kept, drafts[:, 0], verdict.correction)
    assert torch.allclose(torch.bincount(first_token, minlength=5) / rows, p0, atol=0.01)
    bonus = verdict.correction[kept]  # after a kept draft, the next token is drawn from p1
    assert torch.allclose(torch.bincount(bonus, minlength=5) / len(bonus), p1, atol=0.015)
    expected_kept = torch.minimum(p0, q0).sum()  # the rule keeps a draft with probability sum(min(p, q))
    assert abs(kept.float().mean() - expected_kept) < 0.01


# -- choosing k ----------------------------------------------------------------------------------------
def observe_rounds(length: AdaptiveK, alpha: float, step_s: float, draft_s: float, rounds: int = 40) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        k = length.choose(16)
        kept = 0
        while kept < k and torch.rand(1, generator=generator).item() < alpha:
            kept += 1
        length.observe(k, kept, kept < k, draft_s * k, step_s + 0.0005 * (k + 1), k + 1)


def test_k_grows_with_acceptance_and_step_cost_and_shrinks_with_draft_cost() -> None:
    slow_link, fast_link, costly_draft, bad_draft = AdaptiveK(), AdaptiveK(), AdaptiveK(), AdaptiveK()
    observe_rounds(slow_link, alpha=0.9, step_s=0.2, draft_s=0.002)
    observe_rounds(fast_link, alpha=0.9, step_s=0.004, draft_s=0.002)
    observe_rounds(costly_draft, alpha=0.9, step_s=0.2, draft_s=0.05)
    observe_rounds(bad_draft, alpha=0.05, step_s=0.2, draft_s=0.002)
    assert slow_link.choose(16) >= 12
    assert fast_link.choose(16) < slow_link.choose(16)
    assert costly_draft.choose(16) < slow_link.choose(16)
    assert bad_draft.choose(16) == 1
    assert 0.8 < slow_link.alpha < 0.97 and bad_draft.alpha < 0.2
    assert slow_link.choose(3) == 3 and slow_link.choose(0) == 0
    assert AdaptiveK(fixed=5).choose(16) == 5 and AdaptiveK(fixed=5).choose(2) == 2


def test_k_follows_a_link_that_slows_down_and_a_draft_that_goes_bad() -> None:
    """One policy over changing conditions: its estimates forget, so k moves within tens of rounds."""
    length = AdaptiveK()
    observe_rounds(length, alpha=0.9, step_s=0.004, draft_s=0.002)  # a fast link: drafting costs as much as a step
    fast = length.choose(16)
    observe_rounds(length, alpha=0.9, step_s=0.2, draft_s=0.002, rounds=30)  # the round trip grows 50x
    slow = length.choose(16)
    observe_rounds(length, alpha=0.05, step_s=0.2, draft_s=0.002, rounds=30)  # the text the draft is bad at
    assert fast <= 4 and slow >= 10, (fast, slow)
    assert length.choose(16) <= 2 and length.alpha < 0.3


# -- vocabulary ----------------------------------------------------------------------------------------
def save_word_tokenizer(folder: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token=words[0]))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token=words[0]).save_pretrained(folder)


def test_a_draft_with_another_vocabulary_is_refused(tmp_path: Path, draft) -> None:
    with pytest.raises(DraftVocabularyError, match="256 token ids and the model 512"):
        check_vocabulary(build_model("llama", seed=0, vocab_size=256), VOCAB, None)
    check_vocabulary(draft, VOCAB, None)
    words = ["<unk>", *(f"w{index}" for index in range(20))]
    model_folder, same, other = tmp_path / "model", tmp_path / "same", tmp_path / "other"
    save_word_tokenizer(model_folder, words)
    save_word_tokenizer(same, words)
    save_word_tokenizer(other, [*words[:-1], "different"])
    padded = build_model("llama", seed=0, vocab_size=32)  # same tokenizer, embeddings padded to other sizes
    padded.name_or_path = str(same)
    check_vocabulary(padded, 24, str(model_folder))
    padded.name_or_path = str(other)
    with pytest.raises(DraftVocabularyError, match="tokenizer is not the model's"):
        check_vocabulary(padded, 24, str(model_folder))


# -- through the real swarm ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(llama_swarm: LocalSwarm, llama_checkpoint: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(str(llama_checkpoint), llama_swarm.initial_peers) as model:
        yield model


def assert_rolled_back_and_lengths_agree(stats: SpeculationStats, hops: int) -> None:
    rollbacks = 0
    for previous, record in zip(stats.rounds, stats.rounds[1:], strict=False):
        end = previous.start + previous.positions
        assert record.start == end - (previous.drafted - previous.accepted)  # the first rejected position
        rollbacks += record.start < end
    for record in stats.rounds:
        assert record.session_length == record.start + record.positions
        assert record.peer_lengths == (record.session_length,) * hops  # every peer holds what the client thinks
    assert rollbacks > 0


def test_greedy_through_the_swarm_is_identical_with_and_without_a_draft(
    model: DistributedModelForCausalLM, reference, draft
) -> None:
    for ids, mask in [(left_padded_prompts()[0][:1], None), left_padded_prompts()]:
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        plain = model.generate(ids, mask, max_new_tokens=NEW_TOKENS)
        assert model.last_speculation is None
        speculative = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, draft_model=draft)
        stats = model.last_speculation
        assert model.last_forwarding == [True, True, False]  # peers forwarded (the default)
        assert plain.tolist() == expected.tolist() == speculative.tolist()
        assert 0 < stats.acceptance_rate < 1, stats.acceptance_rate
        assert 0 < stats.draft_agreement < 1, stats.draft_agreement
        assert len(stats.rounds) < NEW_TOKENS, "speculation settled more than one token per step"
        assert_rolled_back_and_lengths_agree(stats, hops=3)


def test_greedy_with_a_draft_and_client_driven_hops(llama_swarm: LocalSwarm, llama_checkpoint: Path,
                                                    reference, draft) -> None:
    """The module's model forwards peer to peer (the default); here each hop answers the client."""
    ids = left_padded_prompts()[0][2:3]
    expected = reference.generate(ids, max_new_tokens=16, do_sample=False)
    with DistributedModelForCausalLM.from_pretrained(str(llama_checkpoint), llama_swarm.initial_peers,
                                                     forwarding=False) as client_driven:
        speculative = client_driven.generate(ids, max_new_tokens=16, draft_model=draft)
        stats = client_driven.last_speculation
        assert not any(client_driven.last_forwarding)
    assert speculative.tolist() == expected.tolist()
    assert 0 < stats.acceptance_rate < 1, stats.acceptance_rate
    assert_rolled_back_and_lengths_agree(stats, hops=3)


def test_rejected_positions_leave_no_trace_in_the_peers_caches(model: DistributedModelForCausalLM, reference) -> None:
    """Wrong positions sent, rolled back (all, then some), and the session goes on as if never sent."""
    generator = torch.Generator().manual_seed(11)
    prompt, wrong, right = (torch.randint(0, VOCAB, (1, n), generator=generator) for n in (9, 5, 4))
    run, head = model._loop.run, model.head
    session = InferenceSession(model.swarm, model.standing, 1, 40, [0])
    run(session.open())
    try:
        run(session.step(head.embed(prompt)))
        run(session.step(head.embed(wrong)))  # positions 9..13, all to be rejected
        assert [stream.reported_length for stream in session.hops] == [14] * 3
        after_full = head.logits(run(session.step(head.embed(right), start_position=9)))
        run(session.step(head.embed(wrong)))  # positions 13..17; keep the first two of them
        after_partial = head.logits(run(session.step(head.embed(right), start_position=15)))
        assert session.position == 19
        assert [stream.reported_length for stream in session.hops] == [19] * 3
    finally:
        run(session.close(), 10.0)
    with torch.no_grad():
        full = reference(torch.cat([prompt, right], dim=1)).logits[:, 9:]
        partial = reference(torch.cat([prompt, right, wrong[:, :2], right], dim=1)).logits[:, 15:]
    torch.testing.assert_close(after_full, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after_partial, partial, atol=1e-4, rtol=1e-4)


def test_astream_and_a_draft_given_by_path_through_the_swarm(
    model: DistributedModelForCausalLM, reference, draft, tmp_path: Path
) -> None:
    draft.save_pretrained(tmp_path / "draft")
    ids = left_padded_prompts()[0][1:2]
    expected = reference.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:]

    async def collect() -> list[int]:
        return [int(tokens[0]) async for tokens in model.astream(ids, max_new_tokens=16, draft_model=draft)]

    assert asyncio.run(collect()) == expected[0].tolist()
    streamed = torch.stack(list(model.stream(ids, max_new_tokens=16, draft_model=str(tmp_path / "draft"),
                                             draft_tokens=2)), dim=1)
    assert streamed.tolist() == expected.tolist()
    drafted = [record.drafted for record in model.last_speculation.rounds]
    assert drafted[0] == 2 and max(drafted) == 2  # fewer only where fewer tokens were left to generate


def test_refusals_come_before_any_session_opens(model: DistributedModelForCausalLM) -> None:
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(DraftVocabularyError, match="token ids"):
        model.generate(ids, max_new_tokens=4, draft_model=build_model("llama", seed=0, vocab_size=256))
    with pytest.raises(ValueError, match="draft_tokens needs a draft_model"):
        model.generate(ids, max_new_tokens=4, draft_tokens=3)
    with pytest.raises(ValueError, match="draft_tokens must be in"):
        model.generate(ids, max_new_tokens=4, draft_model=perturbed_draft(), draft_tokens=0)


def test_the_cli_prints_the_acceptance(llama_swarm: LocalSwarm, llama_checkpoint: Path, draft,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from brigade.client.cli import run_generation

    with_tokenizer = tmp_path / llama_checkpoint.name  # same folder name: the same model in the DHT
    build_checkpoint(with_tokenizer, "llama", seed=0)
    save_word_tokenizer(with_tokenizer, ["<unk>", *(f"w{index}" for index in range(VOCAB - 1))])
    draft.save_pretrained(tmp_path / "draft")
    run_generation(str(with_tokenizer), "w5 w9 w13 w2", llama_swarm.initial_peers, max_new_tokens=12,
                   draft_model=str(tmp_path / "draft"))
    printed = capsys.readouterr().out
    assert "12 tokens in" in printed and "speculation:" in printed and "drafted tokens accepted" in printed
