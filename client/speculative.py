"""Speculative decoding: a small local draft proposes tokens, and the swarm checks k + 1 at a time.

Why: a decode step through the swarm costs at least one network trip per hop however little it
computes, and checking k drafted tokens costs the same trips plus a little compute on each peer.
When the draft agrees with the model a fraction α of the time, a step settles
(1 - α^(k+1)) / (1 - α) tokens on average instead of one.

A round: the draft (a transformers causal LM on this machine with the model's vocabulary and its
own KV cache) proposes k tokens; one session step runs the positions the swarm has not seen yet
(the prompt in the first round, the last settled token afterwards) plus the k drafts; the model's
choice at each position is compared with the draft that follows it; the longest agreeing prefix is
kept, plus the model's own token after it; the next step starts at the first wrong position,
which rolls every hop's cache back (peers truncate when a step starts below their length).

Greedy: the model's choice is its argmax, so the tokens are exactly those of plain decoding.
Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023) keeps draft d with
probability min(1, p(d) / q(d)), where p and q are the model's and the draft's distributions after
the same temperature / top-k / top-p warpers, and otherwise draws from max(0, p - q) renormalised;
every token is then distributed exactly as plain sampling's (the random draws differ).

Batches: rows share one session length, so a round keeps the prefix that every unfinished row
agrees on. A row that agreed further gives its next draft as its token at the cut: that is still
the model's argmax (greedy) or a correctly distributed sample (sampling). A finished row agrees
with anything, as its tokens are padding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from brigade.client.decoding import (
    Finisher,
    GenerationOptions,
    StepInput,
    StepReport,
    plain_rope_lengths,
    recomputes,
)
from brigade.client.drafts import K_MAX, DraftCache, DraftRunner, DraftVocabularyError, cache_argument, check_vocabulary
from brigade.client.sampling import TokenChooser

__all__ = ["K_MAX", "AdaptiveK", "DraftCache", "DraftRunner", "DraftVocabularyError", "SpeculationStats",
           "SpeculativeDecoder", "cache_argument", "check_vocabulary", "speculative_decoder", "verify"]

logger = logging.getLogger(__name__)

K_START = 4  # drafts in the first round, before anything is measured
MEMORY = 0.9  # weight of the past, per round, in the acceptance and cost estimates (about ten rounds)
POSITION_BUDGET = 3  # positions a session may send per position of max_length (peers allow 4; one is left for
# failover restarts), so rejected drafts can never exhaust a peer's per-session byte cap
@dataclass(frozen=True)
class Verdict:
    first_rejected: torch.Tensor  # [B] index of each row's first wrong draft (k: every draft kept)
    correction: torch.Tensor  # [B] the model's token at that index: its argmax, a residual or a bonus sample


def verify(drafts: torch.Tensor, logits: torch.Tensor, choose: TokenChooser, sequences: torch.Tensor,
           draft_probs: torch.Tensor | None = None) -> Verdict:
    """Checks drafts [B, k] against the model's logits [B, k + 1, V] (at each draft's position and the one after).

    ``sequences`` [B, L] are the settled tokens before the first draft; ``draft_probs`` [B, k, V]
    the distributions the drafts were sampled from (sampling only).
    """
    batch, k = drafts.shape
    if not choose.params.do_sample:
        best = logits.argmax(dim=-1)  # [B, k + 1]
        first = _first_true(best[:, :k] != drafts, k)
        return Verdict(first, best.gather(1, first[:, None]).squeeze(1))
    p = torch.stack([choose.probabilities(torch.cat([sequences, drafts[:, :i]], dim=1), logits[:, i])
                     for i in range(k + 1)], dim=1)  # [B, k + 1, V]
    rows = torch.arange(batch)
    if k == 0:
        first = torch.zeros(batch, dtype=torch.long)
        target = p[:, 0]
    else:
        if draft_probs is None:
            raise ValueError("sampled drafts need the distributions they were drawn from")
        p_draft = p[:, :k].gather(2, drafts[..., None]).squeeze(2)  # [B, k]
        q_draft = draft_probs.gather(2, drafts[..., None]).squeeze(2)
        uniform = torch.rand(batch, k, generator=choose.generator)
        first = _first_true(uniform * q_draft >= p_draft, k)  # kept iff u < p(d) / q(d)
        at_first = p[rows, first]  # [B, V]: p where the row stopped (after its last draft: the bonus)
        residual = (at_first - draft_probs[rows, first.clamp(max=k - 1)]).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        rejected = (first < k)[:, None] & (mass > 0)  # p == q leaves no residual (and is never rejected)
        target = torch.where(rejected, residual / mass.clamp(min=1e-30), at_first)
    correction = torch.multinomial(target, num_samples=1, generator=choose.generator).squeeze(1)
    return Verdict(first, correction)


def _first_true(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Index of each row's first True in [B, k] (k where none)."""
    if k == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long)
    return torch.where(mask.any(dim=1), mask.long().argmax(dim=1), torch.full((mask.shape[0],), k))


# -- how many to draft ---------------------------------------------------------------------------------
class AdaptiveK:
    """Chooses k in [1, k_max] maximising the expected settled tokens per second of a round.

    With acceptance α per draft (taken as independent), a round of k drafts settles
    E(k) = (1 - α^(k+1)) / (1 - α) tokens and costs T(k) = k·c + b + s·(k + 1), where c is the
    draft's measured time per drafted token and b + s·n the session step's measured time for n
    positions (a least-squares line over recent rounds, so it holds the round trips and the peers'
    compute per position). α is the share of drafts kept over kept-plus-rejections of recent
    rounds (the maximum-likelihood estimate for a geometric run, which stays right when a round
    keeps everything). Every estimate forgets with ``MEMORY`` per round, so k follows a changing
    link or a draft that is good on some text and bad on other. k never drops to 0, so the
    acceptance keeps being measured.
    """

    def __init__(self, k_max: int = K_MAX, k_start: int = K_START, fixed: int | None = None,
                 memory: float = MEMORY):
        self.k_max = k_max
        self.k_start = k_start
        self.fixed = fixed  # a fixed k (bounded by what fits); None: adaptive
        self.memory = memory
        self._kept, self._rejections = 1.0, 1.0  # prior: α = 0.5, worth two observations
        self.draft_token_s: float | None = None  # c
        self._draft_rounds = 0  # rounds that drafted (the first one's time is not a per-token cost)
        self.base_s: float | None = None  # b
        self.slope_s = 0.0  # s
        self._fit = (0.0, 0.0, 0.0, 0.0, 0.0)  # decayed sums over rounds: weight, n, t, n², n·t

    @property
    def alpha(self) -> float:
        return self._kept / (self._kept + self._rejections)

    def observe(self, k: int, kept: int, rejected: bool, draft_s: float, step_s: float, positions: int) -> None:
        m = self.memory
        if k > 0:
            self._kept = m * self._kept + kept
            self._rejections = m * self._rejections + (1.0 if rejected else 0.0)
            self._draft_rounds += 1
            per_token = draft_s / k
            if self._draft_rounds > 1:  # the first draft call pays one-off warm-up (allocations, lazy init)
                self.draft_token_s = per_token if self.draft_token_s is None else (
                    m * self.draft_token_s + (1 - m) * per_token)
        weight, sum_n, sum_t, sum_nn, sum_nt = (m * value for value in self._fit)
        n = float(positions)
        self._fit = (weight + 1, sum_n + n, sum_t + step_s, sum_nn + n * n, sum_nt + n * step_s)
        weight, sum_n, sum_t, sum_nn, sum_nt = self._fit
        mean_n, mean_t = sum_n / weight, sum_t / weight
        spread = sum_nn / weight - mean_n * mean_n
        if spread > 0.25:  # rounds of different sizes: the line's slope is measurable
            self.slope_s = max(0.0, (sum_nt / weight - mean_n * mean_t) / spread)
        self.base_s = max(0.0, mean_t - self.slope_s * mean_n)

    def expected_rate(self, k: int) -> float:
        """Expected settled tokens per second of a round of ``k`` drafts, by the current estimates."""
        alpha = min(max(self.alpha, 0.01), 0.99)
        tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
        seconds = k * (self.draft_token_s or 0.0) + (self.base_s or 0.0) + self.slope_s * (k + 1)
        return tokens / max(seconds, 1e-9)

    def choose(self, limit: int) -> int:
        """k for the next round, at most ``limit`` (0 when nothing may be drafted)."""
        upper = min(self.k_max, limit)
        if upper < 1:
            return 0
        if self.fixed is not None:
            return min(self.fixed, upper)
        if self.base_s is None or self.draft_token_s is None:
            return min(self.k_start, upper)
        return max(range(1, upper + 1), key=self.expected_rate)


# -- the decoder --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundRecord:
    """One speculative round, for tests and benchmarks."""

    start: int  # first position the step sent (below the previous step's end: the hops rolled back)
    positions: int  # positions the step sent: the tokens the swarm had not seen, then the drafts
    drafted: int  # k
    accepted: int  # drafts kept (the model's own next token comes on top)
    rejected: bool  # a draft was found wrong (false when every draft was kept, or EOS / the end cut it short)
    draft_ms: float
    step_ms: float
    session_length: int  # the client session's length after the step
    peer_lengths: tuple[int, ...]  # the session length each hop's peer reported after the step


@dataclass
class SpeculationStats:
    """What speculation did in one generation (``DistributedModelForCausalLM.last_speculation``)."""

    rounds: list[RoundRecord] = field(default_factory=list)  # at most max_new_tokens

    @property
    def drafted(self) -> int:
        return sum(record.drafted for record in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(record.accepted for record in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that were kept (NaN before any draft); lower than the draft's
        per-token agreement, since drafts after a wrong one are dropped unchecked."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def draft_agreement(self) -> float:
        """How often a checked draft was right: kept / (kept + rejections), the α that k adapts to."""
        checked = self.accepted + sum(record.rejected for record in self.rounds)
        return self.accepted / checked if checked else float("nan")

    @property
    def tokens_per_step(self) -> float:
        settled = sum(record.accepted + 1 for record in self.rounds)
        return settled / len(self.rounds) if self.rounds else float("nan")


@dataclass
class _Round:
    k: int
    drafts: torch.Tensor  # [B, k]
    draft_probs: torch.Tensor | None  # [B, k, V] when sampling
    start: int
    positions: int
    draft_s: float


class SpeculativeDecoder:
    """The ``Decoder`` of speculative generation: each step is a round of drafts checked by the swarm."""

    def __init__(self, head: Any, choose: TokenChooser, input_ids: torch.Tensor, options: GenerationOptions,
                 draft: DraftRunner, length: AdaptiveK, stats: SpeculationStats, pad_lengths: list[int] | None = None):
        self.head = head
        self.choose = choose
        self.sequences = input_ids
        self.max_new_tokens = options.max_new_tokens
        self.max_length = input_ids.shape[1] + options.max_new_tokens
        self.finisher = Finisher(input_ids.shape[0], options.eos, options.pad)
        self.draft = draft
        self.length = length
        self.stats = stats
        self.emitted = 0
        self.settled = 0  # positions the hops hold with settled inputs: the next step starts here
        self.prompt_length = input_ids.shape[1]
        self.min_pad = min(pad_lengths) if pad_lengths else 0
        self.sent = 0  # positions sent in all, kept within POSITION_BUDGET
        self._round: _Round | None = None

    def first(self) -> StepInput:
        return self._plan()

    def next(self) -> StepInput | None:
        if self.finisher.done or self.emitted >= self.max_new_tokens:
            return None
        return self._plan()

    def _plan(self) -> StepInput:
        remaining = self.max_new_tokens - self.emitted
        budget = POSITION_BUDGET * self.max_length - self.sent - remaining
        limit = min(remaining - 1, budget, self.draft.room(self.sequences.shape[1]))
        at = self.head.args.recompute_at()
        if at is not None and self.sequences.shape[1] <= at:
            # Plain decoding predicts the tokens up to position ``at`` before it recomputes: no round
            # may check a draft past it, or that draft would be judged by the recomputed call.
            limit = min(limit, at - self.sequences.shape[1])
        k = self.length.choose(limit)
        began = time.perf_counter()
        if k > 0:
            drafts, probs = self.draft.propose(self.sequences, k, self.choose, self.finisher)
        else:
            drafts, probs = self.sequences.new_empty(self.sequences.shape[0], 0), None
        draft_s = time.perf_counter() - began
        start = self.settled
        if recomputes(self.head, start, self.sequences.shape[1] + drafts.shape[1]):
            start = 0  # the whole sequence as one call, as transformers' Phi-3 does at its switch length
        tokens = torch.cat([self.sequences[:, start:], drafts], dim=1)
        self._round = _Round(k, drafts, probs, start, tokens.shape[1], draft_s)
        self.sent += tokens.shape[1]
        end = start + tokens.shape[1]
        lengths = (plain_rope_lengths(self.head, self.prompt_length, self.min_pad, start, end)
                   if self.head.args.rope_by_length else None)
        return StepInput(self.head.embed(tokens), start, lengths)

    def accept(self, out: torch.Tensor, report: StepReport) -> list[torch.Tensor]:
        step, self._round = self._round, None
        if step is None:
            raise RuntimeError("accept() without a planned round")
        k = step.k
        logits = self.head.logits(out[:, -(k + 1):])  # [B, k + 1, V]
        verdict = verify(step.drafts, logits, self.choose, self.sequences, step.draft_probs)
        first = verdict.first_rejected
        emitted: list[torch.Tensor] = []
        rejected = False
        for index in range(k + 1):
            token = verdict.correction if index == k else torch.where(
                first > index, step.drafts[:, index], verdict.correction)
            emitted.append(self.finisher.settle(token))
            if self.emitted + len(emitted) >= self.max_new_tokens or self.finisher.done:
                break
            if index < k and bool((self.finisher.unfinished & (first <= index)).any()):
                rejected = True  # a row still going needs its correction as the next input
                break
        kept = len(emitted) - 1
        self.settled = self.sequences.shape[1] + kept
        self.sequences = torch.cat([self.sequences, torch.stack(emitted, dim=1)], dim=1)
        self.emitted += len(emitted)
        self.length.observe(k, kept, rejected, step.draft_s, report.elapsed_s, step.positions)
        self.stats.rounds.append(RoundRecord(
            start=step.start, positions=step.positions, drafted=k, accepted=kept, rejected=rejected,
            draft_ms=1000 * step.draft_s,
            step_ms=1000 * report.elapsed_s, session_length=report.session_length, peer_lengths=report.peer_lengths))
        return emitted


def speculative_decoder(head: Any, choose: TokenChooser, input_ids: torch.Tensor, options: GenerationOptions,
                        pad_lengths: list[int], draft: Any, draft_tokens: int | None,
                        ) -> tuple[SpeculativeDecoder, SpeculationStats]:
    """A decoder drafting with ``draft`` (already loaded and checked); a fixed k when ``draft_tokens`` is given."""
    if draft_tokens is not None and not 1 <= draft_tokens <= K_MAX:
        raise ValueError(f"draft_tokens must be in [1, {K_MAX}] (or None to adapt), got {draft_tokens}")
    stats = SpeculationStats()
    runner = DraftRunner(draft, pad_lengths, head.args.vocab_size)
    decoder = SpeculativeDecoder(head, choose, input_ids, options, runner, AdaptiveK(fixed=draft_tokens), stats,
                                 pad_lengths)
    return decoder, stats
