"""Choosing the next token from logits, with the same warpers and order as transformers' generate.

Using transformers' own warper classes (temperature, then top-k, then top-p) makes sampling with
a fixed seed give the tokens a local ``generate`` gives over the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float | None = None  # None or 1.0: no scaling
    top_k: int | None = None  # None or 0: no cut
    top_p: float | None = None  # None or 1.0: no cut

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class TokenChooser:
    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None):
        self.params = params
        self.generator = generator  # a request's own random stream (None: torch's global one, as transformers)
        warpers = LogitsProcessorList()
        if params.do_sample:
            if params.temperature is not None and params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                warpers.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
            if params.top_p is not None and params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
        self._warpers = warpers

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The next token [B] for each sequence, given logits [B, V] of the last position."""
        if not self.params.do_sample:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probabilities(input_ids, logits), num_samples=1,
                                 generator=self.generator).squeeze(1)

    def probabilities(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The distribution [B, V] that sampling draws from: speculative sampling compares two of these."""
        return self._warpers(input_ids, logits).softmax(dim=-1)
