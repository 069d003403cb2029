"""The family seam: every supported family computes what transformers computes, span by span, with
bounded caches for sliding-window layers; what cannot be served is refused by name, before loading.

fp32 on CPU: atol/rtol 1e-4 (our layers and transformers' differ only in summation order).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from brigade_testkit import FAMILIES, WINDOW, WINDOWED_FAMILIES, build_checkpoint, build_model
from transformers import FalconConfig, FalconForCausalLM, Gemma3Config, Gemma3TextConfig, GPT2Config, LlamaConfig

from brigade.kernels.batch import Segment
from brigade.kernels.cache import KVCache, ring_size
from brigade.kernels.families import SUPPORTED_MODEL_TYPES, family_for, model_args
from brigade.kernels.loading import load_head, load_span
from brigade.kernels.span import UnsupportedModelError

TOLERANCE = dict(atol=1e-4, rtol=1e-4)
SPANS = [(0, 2), (2, 3), (3, 4), (4, 6)]


def _garbage_cache(span, batch: int, capacity: int) -> KVCache:
    """A session cache as a peer allocates it, filled with NaN as reused memory may be."""
    cache = span.args.new_cache(span.start, span.end, batch, capacity, torch.float32, "cpu")
    for tensor in (*cache.keys, *cache.values):
        tensor.fill_(float("nan"))
    return cache


def _padded_prompt(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 512, (3, length), generator=torch.Generator().manual_seed(0))
    pads = torch.tensor([0, 5, length - 6])
    mask = (torch.arange(length)[None] >= pads[:, None]).long()
    return ids, mask, pads


def test_every_supported_model_type_has_a_tiny_checkpoint_for_its_parity_tests() -> None:
    tested = {config_class().model_type for config_class, _, _ in FAMILIES.values()}
    assert set(SUPPORTED_MODEL_TYPES) <= tested, f"no parity checkpoint for {set(SUPPORTED_MODEL_TYPES) - tested}"


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
def test_windowed_layers_keep_a_bounded_ring_and_match_transformers(family: str, tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path / family, family, seed=2)
    reference = build_model(family, seed=2)
    head = load_head(str(folder))
    spans = [load_span(str(folder), start, end) for start, end in SPANS]
    ids, mask, pads = _padded_prompt(40)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits

    caches = [_garbage_cache(span, 3, 64) for span in spans]
    ring = ring_size(WINDOW)
    # A prefill longer than the ring, a step within the slack, decode steps that wrap around.
    chunks = [(0, 20), (20, 23), *((i, i + 1) for i in range(23, 40))]
    pieces = []
    for begin, end in chunks:
        hidden = head.embed(ids[:, begin:end])
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, pads, cache)
        pieces.append(head.logits(hidden))
    got = torch.cat(pieces, dim=1)
    for row, pad in enumerate(pads.tolist()):
        torch.testing.assert_close(got[row, pad:], expected[row, pad:], **TOLERANCE)

    for span, cache in zip(spans, caches, strict=True):
        for index, window in enumerate(span.args.layer_windows[span.start : span.end]):
            assert cache.keys[index].shape[2] == (64 if window is None else ring), "a windowed layer's ring is bounded"
    assert spans[0].args.cache_positions(4096, 0, 6) < 4096

    # Rolling back within the slack keeps what the next positions attend to.
    for cache in caches:
        cache.truncate(40 - WINDOW)
    hidden = head.embed(ids[:, 40 - WINDOW :])
    for span, cache in zip(spans, caches, strict=True):
        hidden = span(hidden, pads, cache)
    replayed = head.logits(hidden)
    for row, pad in enumerate(pads.tolist()):
        skip = max(pad - (40 - WINDOW), 0)  # padding slots compute nothing that is compared
        torch.testing.assert_close(replayed[row, skip:], expected[row, 40 - WINDOW + skip :], **TOLERANCE)
    windowed = next(c for c in caches if any(w is not None for w in c.windows))
    with pytest.raises(ValueError, match="replay the session"):
        windowed.truncate(40 - WINDOW - 1)


def test_ragged_sessions_on_rings_in_one_pass_match_each_alone(tmp_path: Path) -> None:
    span = load_span(str(build_checkpoint(tmp_path / "mistral", "mistral_window", seed=3)), 0, 6)
    generator = torch.Generator().manual_seed(0)
    # (already cached, new positions): a linear step, an in-place ring step, a step longer than the slack
    shapes = [(3, 4), (20, 2), (12, 11)]
    pads = torch.tensor([0, 1])
    alone_caches, together_caches = [_garbage_cache(span, 2, 64) for _ in shapes], []
    for (cached, _), cache in zip(shapes, alone_caches, strict=True):
        span(torch.randn(2, cached, 64, generator=generator), pads, cache)
        copy = KVCache(cache.start, [k.clone() for k in cache.keys], [v.clone() for v in cache.values],
                       cache.length, cache.windows)
        copy.grow(cache.capacity)
        together_caches.append(copy)
    steps = [torch.randn(2, new, 64, generator=generator) for _, new in shapes]
    alone = [span(x, pads, cache) for x, cache in zip(steps, alone_caches, strict=True)]
    together = span.forward_segments([Segment(x, pads, c) for x, c in zip(steps, together_caches, strict=True)])
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b, a, **TOLERANCE)


def test_a_mixtral_peer_for_layers_2_to_4_reads_only_those_layers_experts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = build_checkpoint(tmp_path / "mixtral", "mixtral", seed=4, shard_size="100KB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    family = family_for(build_model("mixtral").config)
    read: list[str] = []
    real_safe_open = safetensors.safe_open

    class Spy:
        def __init__(self, path, *args, **kwargs):
            self._inner = real_safe_open(path, *args, **kwargs)

        def __enter__(self):
            self._file = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self._file.get_tensor(name)

    monkeypatch.setattr("brigade.kernels.checkpoint.safe_open", Spy)
    span = load_span(str(folder), 2, 4)

    experts = {name for name in weight_map if ".experts." in name}
    wanted = {name for name in experts if family.layer_of(name) in (2, 3)}
    assert len(wanted) == 2 * 4 * 3  # 2 layers x 4 experts x w1/w2/w3
    assert {name for name in read if ".experts." in name} == wanted
    assert {family.layer_of(name) for name in read} == {2, 3}
    assert sum(1 for name, _ in span.named_parameters() if ".experts." in name) == len(wanted)

    reference = build_model("mixtral", seed=4)
    hidden = torch.randn(2, 5, 64)
    positions = torch.arange(5)[None].expand(2, 5)
    with torch.no_grad():
        rotary = reference.model.rotary_emb(hidden, positions)
        expected = hidden
        for layer in reference.model.layers[2:4]:
            expected = layer(expected, position_embeddings=rotary, attention_mask=None)
    torch.testing.assert_close(span(hidden, torch.zeros(2, dtype=torch.long)), expected, **TOLERANCE)


FALCON_SHAPE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_hidden_size=160,
                    max_position_embeddings=512, initializer_range=0.25, bos_token_id=None, eos_token_id=None)


@pytest.mark.parametrize(
    "options",
    [
        dict(multi_query=True, parallel_attn=True),  # Falcon-7B
        dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),  # Falcon 2 11B
        dict(multi_query=False, parallel_attn=False, bias=True),  # per-head interleaved q/k/v, sequential
    ],
    ids=["7b-multi-query", "11b-one-norm", "interleaved-sequential"],
)
def test_falcon_layouts_match_transformers(options: dict, tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = FalconForCausalLM(FalconConfig(**FALCON_SHAPE, **options)).eval()
    reference.save_pretrained(tmp_path)
    head = load_head(str(tmp_path))
    spans = [load_span(str(tmp_path), start, end) for start, end in [(0, 1), (1, 3), (3, 4)]]
    ids, mask, pads = _padded_prompt(12)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    caches = [_garbage_cache(span, 3, 16) for span in spans]
    pieces = []
    for begin, end in [(0, 10), (10, 11), (11, 12)]:
        hidden = head.embed(ids[:, begin:end])
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, pads, cache)
        pieces.append(head.logits(hidden))
    got = torch.cat(pieces, dim=1)
    for row, pad in enumerate(pads.tolist()):
        torch.testing.assert_close(got[row, pad:], expected[row, pad:], **TOLERANCE)


def _with_rope(parameters: dict) -> LlamaConfig:
    """A Llama config whose rope settings skip transformers' own validation (as an edited config.json can)."""
    config = LlamaConfig()
    config.rope_parameters = parameters
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GPT2Config(), r"'gpt2' is not supported; supported: bloom, falcon, gemma2, gemma3_text, llama, mistral, "
                       "mixtral"),
        (Gemma3Config(), r"'gemma3' \(a multimodal config; its text model is 'gemma3_text'\) is not supported"),
        (FalconConfig(alibi=True), "ALiBi"),
        (_with_rope({"rope_type": "proportional", "rope_theta": 1e4}),
         "rope type 'proportional' is not supported; supported: default, linear, yarn, llama3, dynamic, longrope"),
        (_with_rope({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),
         "rope type 'llama3' needs the field 'low_freq_factor'"),
        (Gemma3TextConfig(use_bidirectional_attention=True), "bidirectional"),
        (FalconConfig(activation="relu"), "activation 'relu'"),
    ],
    ids=["unknown-type", "multimodal", "alibi", "unknown-rope", "rope-field-missing", "bidirectional", "activation"],
)
def test_what_cannot_be_served_is_refused_by_name(config: object, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        model_args(config)


def test_a_peer_refuses_an_unsupported_model_before_starting_anything(tmp_path: Path) -> None:
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-m", "brigade", "peer", "run", str(tmp_path), "--initial-peers", "x"],
                            capture_output=True, text=True, timeout=120, env={"COLUMNS": "300", "PATH": "/usr/bin"})
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, output
    assert "'gpt2' is not supported" in output and "mixtral" in output and "Traceback" not in output


def test_quantized_mixtral_keeps_its_router_exact(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from brigade.kernels.quant import quantize_span

    folder = build_checkpoint(tmp_path / "mixtral", "mixtral", seed=6)
    exact = load_span(str(folder), 0, 2)
    quantized = quantize_span(load_span(str(folder), 0, 2), "int8")
    moe = quantized.layers[0].block_sparse_moe
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for expert in moe.experts for m in expert.children())
    assert moe.gate.weight.dtype == torch.float32
    hidden = torch.randn(1, 6, 64)
    pads = torch.zeros(1, dtype=torch.long)
    expected, got = exact(hidden, pads), quantized(hidden, pads)
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()
