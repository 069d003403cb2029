"""Every published config in tests/fixtures/configs, computed span by span, matches transformers.

In process and fast; ``tests/client/test_real_config_swarm.py`` runs the same configs through real
peer processes. fp32 on CPU: atol/rtol 1e-4 on logits (summation order is all that differs).

Rotary tables are compared with transformers' own rotary module, position by position, across the
lengths where a scaled rope changes: a whole call longer than the switch, and a generation that
crosses it one step at a time (which is where LongRoPE and dynamic NTK differ from a per-position rule).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import safetensors
import torch
from brigade_configs import FIXTURES, NAMES, RealConfig, assert_logits_close, build_checkpoint, prompt, reference

from brigade.kernels.families import FAMILIES, family_for, model_args
from brigade.kernels.loading import load_config, load_head, load_span
from brigade.kernels.rope import LENGTH_ROPE_TYPES, Rotary, rope_layer_types, rope_type_of

REQUIRED = {  # the published checkpoints the suite must cover (issue 17), each by its Hub id
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.3-70B-Instruct",
    "mistralai/Mistral-7B-v0.3", "mistralai/Mistral-Nemo-Base-2407", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-0.5B",
    "Qwen/Qwen3-8B", "mistralai/Mixtral-8x7B-v0.1", "google/gemma-2-9b", "google/gemma-3-1b-pt", "google/gemma-3-4b-pt",
    "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct", "tiiuae/falcon-7b", "tiiuae/falcon-40b",
    "HuggingFaceTB/SmolLM2-135M", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "bigscience/bloom-560m",
}
ROPE_VARIANTS = {"default", "linear", "dynamic", "yarn", "longrope", "llama3"}


def test_fixtures_cover_the_published_checkpoints_every_family_and_every_rope_variant() -> None:
    reals = [RealConfig.load(name) for name in NAMES]
    assert REQUIRED <= {real.checkpoint for real in reals}
    for real in reals:
        data = json.loads((FIXTURES / f"{real.name}.json").read_text())
        assert urlparse(real.source).netloc == "huggingface.co", real.name
        assert data["shrunk"], f"{real.name}: say what was shrunk and from what"
        assert set(data["shrunk"]) <= {"hidden_size", "intermediate_size", "num_hidden_layers", "n_layer", "vocab_size",
                                       "num_attention_heads", "n_head", "num_key_value_heads", "num_kv_heads",
                                       "bos_token_id", "eos_token_id", "pad_token_id"}, real.name
    assert {family.name for family in FAMILIES} == {family_for(real.config).name for real in reals}
    variants = {rope_type_of(real.config, kind) for real in reals for kind in rope_layer_types(real.config)
                if real.config.model_type != "bloom"}
    assert variants == ROPE_VARIANTS


def _rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    return next(module for module in model.modules() if type(module).__name__.endswith("RotaryEmbedding"))


def _reference_tables(module: torch.nn.Module, positions: torch.Tensor, kind: str | None) -> tuple:
    x = torch.zeros(1, positions.shape[-1], 8)
    args = (kind,) if kind is not None else ()
    return module(x, positions[None], *args)


@pytest.mark.parametrize("name", NAMES)
def test_rotary_tables_equal_transformers_across_the_switch_length(name: str) -> None:
    real = RealConfig.load(name)
    if real.config.model_type == "bloom":
        pytest.skip("ALiBi: no rotary table")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # as a peer builds its span: the tables must still be real numbers
        head_dim = model_args(real.config).head_dim
        ours = {kind: Rotary(real.config, head_dim, kind) for kind in rope_layer_types(real.config)}
    switch = real.rope_switch or 64
    for kind, rotary in ours.items():
        assert rotary.inv_freq.device.type == "cpu"
        # A whole call longer than the switch (a long prompt), on a fresh module as a fresh model would be.
        reference_rotary = _rotary_module(AutoModelForCausalLM.from_config(real.config))
        whole = torch.arange(switch + 3)
        expected = _reference_tables(reference_rotary, whole, kind)
        got = rotary(whole, torch.float32, torch.full_like(whole, switch + 3))
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e[0], g), f"{name} {kind}: whole-call tables differ"
        # A generation crossing the switch one position at a time, after a prompt just below it.
        reference_rotary = _rotary_module(AutoModelForCausalLM.from_config(real.config))
        _reference_tables(reference_rotary, torch.arange(switch - 2), kind)
        for position in range(switch - 2, switch + 2):
            step = torch.tensor([position])
            expected = _reference_tables(reference_rotary, step, kind)
            got = rotary(step, torch.float32, torch.tensor([position + 1]))
            for e, g in zip(expected, got, strict=True):
                assert torch.equal(e[0], g), f"{name} {kind}: tables differ at step {position}"
        if rotary.by_length:
            assert rotary.rope_type in LENGTH_ROPE_TYPES
            short, _ = rotary(whole[-1:], torch.float32, torch.tensor([switch - 2]))
            long, _ = rotary(whole[-1:], torch.float32, torch.tensor([switch + 3]))
            assert not torch.equal(short, long), "the switch must matter for this config"


@pytest.mark.parametrize("name", NAMES)
def test_spans_of_the_published_config_match_transformers(name: str, tmp_path: Path) -> None:
    real = RealConfig.load(name)
    folder = build_checkpoint(real, tmp_path / name)
    expected_model = reference(folder)
    config = load_config(str(folder))
    head = load_head(str(folder), config=config)
    spans = [load_span(str(folder), start, end, config=config) for start, end in real.spans()]
    ids = prompt(real, 24).expand(2, 24).clone()
    ids[1, :5] = 0
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # the second row is left-padded
    pads = torch.tensor([0, 5])
    # Positions as generate counts them (the first real token of a padded row is position 0), as peers do.
    positions = {} if real.config.model_type == "bloom" else {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
    with torch.no_grad():
        expected = expected_model(ids, attention_mask=mask, **positions).logits
    caches = [span.args.new_cache(span.start, span.end, 2, 32, torch.float32, "cpu") for span in spans]
    pieces = []
    for begin, end in [(0, 20), (20, 21), (21, 22), (22, 24)]:
        hidden = head.embed(ids[:, begin:end])
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, pads, cache)
        pieces.append(head.logits(hidden))
    got = torch.cat(pieces, dim=1)
    for row, pad in enumerate(pads.tolist()):
        assert_logits_close(got[row, pad:], expected[row, pad:])


@pytest.mark.parametrize("peer_dtype", [torch.float32, torch.bfloat16], ids=["fp32-peer", "bf16-peer"])
def test_a_bf16_checkpoint_loads_into_fp32_and_bf16_spans(peer_dtype: torch.dtype, tmp_path: Path) -> None:
    real = RealConfig.load("llama-3.2-1b")
    folder = build_checkpoint(real, tmp_path / "bf16", dtype=torch.bfloat16)
    with safetensors.safe_open(folder / "model.safetensors", framework="pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.bfloat16}
    expected_model = reference(folder)  # transformers upcasts the bf16 weights to fp32, as our fp32 peer does
    spans = [load_span(str(folder), start, end, dtype=peer_dtype) for start, end in real.spans()]
    head = load_head(str(folder), dtype=peer_dtype)
    assert {p.dtype for span in spans for p in span.parameters()} == {peer_dtype}
    ids = prompt(real, 16)
    with torch.no_grad():
        expected = expected_model(ids).logits
    hidden = head.embed(ids)
    for span in spans:
        hidden = span(hidden, torch.zeros(1, dtype=torch.long))
    got = head.logits(hidden)
    if peer_dtype == torch.float32:
        assert_logits_close(got, expected)
    else:  # bf16 compute: about three significant digits per op
        assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


def test_a_sharded_checkpoint_opens_only_the_shards_of_the_span(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = RealConfig.load("tinyllama-1.1b")
    folder = build_checkpoint(real, tmp_path / "sharded", shard_size="1MB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    family = family_for(real.config)
    needed = {file for name, file in weight_map.items() if family.layer_of(name) in (2, 3)}
    assert len(set(weight_map.values())) > len(needed) > 0, "the test needs shards the span does not use"
    opened: list[str] = []
    real_safe_open = safetensors.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr("brigade.kernels.checkpoint.safe_open", spy)
    load_span(str(folder), 2, 4)
    assert set(opened) == needed


def test_dynamic_ntk_tables_for_many_lengths_at_once_equal_transformers_one_by_one() -> None:
    """A pass may bring many sessions of different lengths: their tables come from one vectorised op,
    bit for bit what transformers computes for each length alone."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    real = RealConfig.load("llama-2-7b-dynamic-ntk")
    rotary = Rotary(real.config, model_args(real.config).head_dim)
    lengths = torch.cat([torch.arange(4090, 4200), torch.arange(4200, 40000, 97)])
    tables = rotary._tables(lengths)
    for length, table in zip(lengths.tolist(), tables, strict=True):
        if length <= real.config.max_position_embeddings:
            expected = rotary.inv_freq
        else:
            expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](real.config, torch.device("cpu"), seq_len=torch.tensor(length))
        assert torch.equal(table, expected), length


def test_alibi_attention_in_query_blocks_equals_one_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long BLOOM prefill builds its ALiBi bias a block of queries at a time; the result does not change."""
    real = RealConfig.load("bloom-176b")
    folder = build_checkpoint(real, tmp_path / "bloom")
    span = load_span(str(folder), 0, 2)
    hidden = torch.randn(2, 40, span.args.hidden_size, generator=torch.Generator().manual_seed(0))
    pads = torch.tensor([0, 7])
    whole = span(hidden, pads, span.args.new_cache(0, 2, 2, 64, torch.float32, "cpu"))
    monkeypatch.setattr("brigade.kernels.batch.ALIBI_BIAS_ELEMENTS", 2 * 6 * 40 * 3)  # three queries a block
    blocked = span(hidden, pads, span.args.new_cache(0, 2, 2, 64, torch.float32, "cpu"))
    scale = float(whole.abs().max())  # random weights make residuals of hundreds: compare relative to them
    torch.testing.assert_close(blocked[1, 7:], whole[1, 7:], atol=3e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(blocked[0], whole[0], atol=3e-5 * scale, rtol=1e-5)
