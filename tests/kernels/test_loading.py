"""A peer reads only its own layers' tensors from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from brigade_testkit import build_checkpoint, build_model

from brigade.kernels.checkpoint import layer_of
from brigade.kernels.loading import load_head, load_span


def test_peer_for_layers_4_to_8_reads_only_those_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = build_checkpoint(tmp_path / "sharded", "llama", seed=3, shard_size="60KB", num_hidden_layers=10)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 10, "each layer should sit in its own shard for this test"

    # Shards that hold nothing of layers 4..7 are deleted: reading any of them would fail.
    needed = {file for name, file in weight_map.items() if layer_of(name) in range(4, 8)}
    for file in set(weight_map.values()) - needed:
        (folder / file).unlink()

    opened_files: list[str] = []
    read_names: list[str] = []
    real_safe_open = safetensors.safe_open

    class SpyingSafeOpen:
        def __init__(self, path, *args, **kwargs):
            opened_files.append(Path(path).name)
            self._inner = real_safe_open(path, *args, **kwargs)

        def __enter__(self):
            self._file = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._file.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            read_names.append(name)
            return self._file.get_tensor(name)

    monkeypatch.setattr("brigade.kernels.checkpoint.safe_open", SpyingSafeOpen)
    span = load_span(str(folder), 4, 8)

    assert read_names, "the spy saw no reads"
    assert {layer_of(name) for name in read_names} == {4, 5, 6, 7}
    assert set(opened_files) <= needed
    reference = build_model("llama", seed=3, num_hidden_layers=10)
    hidden = torch.randn(2, 5, 64)
    expected = hidden
    positions = torch.arange(5)[None].expand(2, 5)
    with torch.no_grad():
        rotary = reference.model.rotary_emb(hidden, positions)
        for layer in reference.model.layers[4:8]:
            expected = layer(expected, position_embeddings=rotary, attention_mask=None)
            expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(span(hidden, torch.zeros(2, dtype=torch.long)), expected, atol=1e-4, rtol=1e-4)


def test_head_loads_tied_and_untied_embeddings(tmp_path: Path) -> None:
    for tied in (False, True):
        folder = build_checkpoint(tmp_path / f"tied-{tied}", "llama", seed=4, tie_word_embeddings=tied)
        head = load_head(str(folder))
        reference = build_model("llama", seed=4, tie_word_embeddings=tied)
        torch.testing.assert_close(head.lm_head.weight, reference.lm_head.weight)
        assert (head.lm_head.weight is head.embed_tokens.weight) == tied


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from brigade.kernels.checkpoint import Checkpoint, CheckpointError

    with pytest.raises(CheckpointError, match="safetensors"):
        Checkpoint.open(tmp_path)
