"""Tiny checkpoints built from the published configs in ``tests/fixtures/configs``.

Each fixture holds the ``config.json`` fields of a published checkpoint, written from their
published values, with only sizes shrunk (``shrunk`` keeps what they were). A checkpoint built
here carries that config exactly as published (legacy ``rope_scaling`` spellings and all), so the
peer parses it the way it parses the real one, and the reference is transformers'
``from_pretrained`` of the same folder.

Weights are random from a seed, at a scale where greedy tokens vary: transformers' init with
``initializer_range=0.25``, norm weights moved off their identity init (so loading them is
tested too), and, for Gemma (embeddings tied and scaled by sqrt(hidden)), embeddings shrunk by
that scale so the output is not an echo of the input. The first seed whose greedy output varies
is used, and ``build_checkpoint`` asserts that it does.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from brigade.kernels.families import model_args
from brigade.kernels.rope import rope_layer_types, rope_parameters_of

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
NAMES = sorted(path.stem for path in FIXTURES.glob("*.json"))
NEW_TOKENS = 24
SHORT_PROMPT = 40
INIT_SCALE = 0.25
NORM_NOISE = 0.3
SEEDS = range(20)


@dataclass(frozen=True)
class RealConfig:
    name: str
    checkpoint: str  # the published checkpoint's Hub id
    source: str
    published: dict[str, Any]  # config.json as published, sizes shrunk

    @classmethod
    def load(cls, name: str) -> RealConfig:
        data = json.loads((FIXTURES / f"{name}.json").read_text())
        return cls(name, data["checkpoint"], data["source"], data["config"])

    @cached_property
    def config(self) -> PretrainedConfig:
        fields = dict(self.published)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    @cached_property
    def layer_kinds(self) -> list[tuple[object, ...]]:
        """What sets each layer apart from its neighbours: its sliding window and its rotary settings."""
        args = model_args(self.config)
        types = getattr(self.config, "layer_types", None) or [None] * args.num_layers
        return [(window, kind) for window, kind in zip(args.layer_windows, types, strict=True)]

    def spans(self) -> list[tuple[int, int]]:
        """Peers' spans: cut where layers of different kinds meet (two cuts at most), else in the middle."""
        layers = len(self.layer_kinds)
        cuts = [i for i in range(1, layers) if self.layer_kinds[i] != self.layer_kinds[i - 1]][:2] or [layers // 2]
        bounds = [0, *cuts, layers]
        return list(itertools.pairwise(bounds))

    @property
    def windows(self) -> list[int]:
        args = model_args(self.config)
        return [window for window in args.layer_windows if window is not None and window < args.max_position_embeddings]

    @property
    def rope_switch(self) -> int | None:
        """The length past which the rotary table changes or scaling matters most: longrope's and llama3's
        original length, dynamic NTK's max_position_embeddings."""
        switches = []
        for kind in rope_layer_types(self.config):
            rope = rope_parameters_of(self.config, kind)
            rope_type = rope.get("rope_type", "default")
            if rope_type in ("longrope", "llama3"):
                switches.append(int(rope["original_max_position_embeddings"]))
            elif rope_type == "dynamic":
                switches.append(int(self.config.max_position_embeddings))
        return max(switches) if switches else None

    def prompt_length(self) -> int:
        """Longer than every sliding window; for a scaled rope, ending just before its switch length so
        that generation runs past it; short otherwise."""
        length = SHORT_PROMPT
        if self.windows:
            length = max(length, max(self.windows) + 16)
        if self.rope_switch is not None:
            length = max(length, self.rope_switch - NEW_TOKENS // 3)
        return length

    def max_length(self) -> int:
        return self.prompt_length() + NEW_TOKENS


def _randomize(model: PreTrainedModel, config: PretrainedConfig, generator: torch.Generator) -> None:
    with torch.no_grad():
        if getattr(config, "model_type", "").startswith("gemma"):
            model.get_input_embeddings().weight.mul_(config.hidden_size**-0.5)
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.dim() == 1:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * NORM_NOISE)


def build_model(real: RealConfig, seed: int) -> PreTrainedModel:
    config = real.config.__class__.from_dict(real.config.to_dict())
    config.initializer_range = INIT_SCALE
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, config, torch.Generator().manual_seed(seed))
    return model


def distinct_greedy_tokens(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> int:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return len(set(out[0, ids.shape[1] :].tolist()))


def varies(model: PreTrainedModel) -> bool:
    return distinct_greedy_tokens(model, torch.arange(1, 9)[None]) >= NEW_TOKENS // 3


def build_checkpoint(real: RealConfig, folder: Path, *, dtype: torch.dtype = torch.float32,
                     shard_size: str | None = None) -> Path:
    """Saves a tiny random model of ``real`` in ``folder`` with the published config.json."""
    for seed in SEEDS:
        model = build_model(real, seed)
        if varies(model):
            break
    else:
        raise AssertionError(f"{real.name}: greedy output repeats itself for every seed in {SEEDS}")
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    (folder / "config.json").write_text(json.dumps(real.published, indent=2))  # as the publisher wrote it
    return folder


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The suite's logit tolerance in fp32 on CPU: |got - expected| <= 1e-4 + 5e-5 * max|expected| + 1e-4 * |expected|.

    Peers and transformers differ only in summation order, so the error grows with the size of the
    activations: random weights at init scale 0.25 make residuals of several hundred, and logits
    of ~30, in the wider configs (observed: about 1e-5 of the largest logit). A wrong rotary
    table, mask or norm is off by O(1).
    """
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=1e-4 + 5e-5 * scale, rtol=1e-4)


def reference(folder: Path) -> PreTrainedModel:
    """transformers' own model of the checkpoint, in fp32: what a distributed run must match."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompt(real: RealConfig, length: int | None = None, seed: int = 0) -> torch.Tensor:
    vocab = real.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length or real.prompt_length()), generator=generator)
