"""One generation's per-step logic, shared by ``stream`` and ``astream`` (plain or speculative).

A decoder is a small state machine over plain tensors: ``first()`` gives the first step's input,
``accept(out, report)`` turns the last hop's output into the tokens that step settles, and
``next()`` gives the following step's input, or None once the generation is over (EOS in every
row, or ``max_new_tokens``). The loops in ``model.py`` only carry tensors between a decoder and
an ``InferenceSession``, so the sync and the async loop cannot drift apart, and speculative
decoding (``speculative.py``) is a second decoder rather than a third loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import GenerationConfig

from brigade.client.sampling import SamplingParams, TokenChooser


@dataclass(frozen=True)
class StepInput:
    """What one session step sends: embeddings of new positions, and where they start."""

    hidden: torch.Tensor  # [B, T, H]
    start: int | None = None  # first position; None: the session's length. Lower: the peers roll back to it
    # Length-dependent ropes only: each position's call length (None: the step is one call, as plain decoding's are).
    rope_lengths: list[int] | None = None


@dataclass(frozen=True)
class StepReport:
    """What the loop measured around one session step (speculation adapts to it)."""

    elapsed_s: float  # wall time of the step through every hop, recoveries included
    session_length: int  # positions the session holds after the step
    peer_lengths: tuple[int, ...]  # session length each hop's peer reported with its last result


class Decoder(Protocol):
    def first(self) -> StepInput: ...

    def accept(self, out: torch.Tensor, report: StepReport) -> list[torch.Tensor]: ...

    def next(self) -> StepInput | None: ...


@dataclass(frozen=True)
class GenerationOptions:
    """A call's sampling and stopping options with the checkpoint's generation config filled in."""

    params: SamplingParams
    eos: list[int]
    pad: int | None
    max_new_tokens: int

    @classmethod
    def resolve(cls, defaults: GenerationConfig, *, max_new_tokens: int, do_sample: bool | None = None,
                temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> GenerationOptions:
        params = SamplingParams(
            do_sample=bool(defaults.do_sample if do_sample is None else do_sample),
            temperature=defaults.temperature if temperature is None else temperature,
            top_k=defaults.top_k if top_k is None else top_k,
            top_p=defaults.top_p if top_p is None else top_p,
        )
        eos = _as_list(defaults.eos_token_id if eos_token_id is None else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else defaults.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        return cls(params, eos, pad, max_new_tokens)


class Finisher:
    """EOS as transformers' generate handles it: a row that emitted EOS gets ``pad`` from then on."""

    def __init__(self, batch_size: int, eos: list[int], pad: int | None):
        self.eos = eos
        self.eos_ids = torch.tensor(eos, dtype=torch.long)
        self.pad = pad
        self.unfinished = torch.ones(batch_size, dtype=torch.bool)

    def settle(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens [B] a step really emits (pad for finished rows); marks rows that just emitted EOS."""
        if not self.eos:
            return tokens
        tokens = torch.where(self.unfinished, tokens, torch.full_like(tokens, self.pad))
        self.unfinished &= ~torch.isin(tokens, self.eos_ids)
        return tokens

    @property
    def done(self) -> bool:
        return not bool(self.unfinished.any())


def recomputes(head: Any, past: int, total: int) -> bool:
    """True when a step growing the session from ``past`` to ``total`` positions must instead send the whole
    sequence from position 0 (``ModelArgs.recompute_at``: Phi-3 crossing its original length)."""
    at = head.args.recompute_at()
    return at is not None and past <= at < total


def plain_rope_lengths(head: Any, prompt: int, min_pad: int, start: int, end: int) -> list[int]:
    """The call length plain decoding gives each of positions [start, end) of a sequence grown to ``end``.

    The prompt is one call (``prompt``), each later position one of its own (``p + 1``); a Phi-3
    sequence that has passed ``recompute_at`` was recomputed as one call of ``at + 1`` up to there.
    Speculative rounds send these, so their tokens are plain decoding's, not those of a model whose
    table followed each round's length. Lengths count from the least padding, as positions do.
    """
    at = head.args.recompute_at()
    recomputed = at is not None and prompt <= at < end

    def length(position: int) -> int:
        if recomputed and position <= at:
            return at + 1
        return prompt if position < prompt else position + 1

    return [length(position) - min_pad for position in range(start, end)]


class StepDecoder:
    """Plain decoding: one position per step, the next token chosen from the last position's logits."""

    def __init__(self, head: Any, choose: TokenChooser, input_ids: torch.Tensor, options: GenerationOptions):
        self.head = head
        self.choose = choose
        self.sequences = input_ids
        self.max_new_tokens = options.max_new_tokens
        self.finisher = Finisher(input_ids.shape[0], options.eos, options.pad)
        self.emitted = 0

    def first(self) -> StepInput:
        return StepInput(self.head.embed(self.sequences))

    def accept(self, out: torch.Tensor, report: StepReport) -> list[torch.Tensor]:
        tokens = self.finisher.settle(self.choose(self.sequences, self.head.logits(out[:, -1])))
        self.sequences = torch.cat([self.sequences, tokens[:, None]], dim=1)
        self.emitted += 1
        return [tokens]

    def next(self) -> StepInput | None:
        if self.finisher.done or self.emitted >= self.max_new_tokens:
            return None
        length = self.sequences.shape[1]
        if recomputes(self.head, length - 1, length):
            return StepInput(self.head.embed(self.sequences), 0)
        return StepInput(self.head.embed(self.sequences[:, -1:]))


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
