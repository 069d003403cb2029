"""A peer that cannot serve a checkpoint says why in one line (model, what is wrong, what to do) and
exits non-zero: no traceback, and nothing joins the swarm when the checkpoint itself is at fault
(those exit 2, before anything starts; what goes wrong while starting exits 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from brigade_configs import RealConfig, build_checkpoint

from brigade.deploy.launcher import LocalSwarm

PEER = [sys.executable, "-m", "brigade", "peer", "run"]


def _run_peer(folder: Path, *extra: str, initial: str = "/ip4/127.0.0.1/tcp/9/p2p/QmNone") -> tuple[int, str]:
    env = {**os.environ, "COLUMNS": "400"}
    result = subprocess.run([*PEER, str(folder), "--initial-peers", initial, *extra],
                            capture_output=True, text=True, timeout=120, env=env)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(RealConfig.load("llama-3.2-1b"), tmp_path_factory.mktemp("load-errors") / "llama")


def _copy(checkpoint: Path, folder: Path, config: dict | None = None) -> Path:
    folder.mkdir()
    for path in checkpoint.iterdir():
        (folder / path.name).symlink_to(path)
    if config is not None:
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _one_line(output: str) -> str:
    """The refusal as one line of words (typer boxes a usage error; the box's borders are dropped)."""
    assert "Traceback" not in output, output
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize(("change", "expected"), [
    ({"intermediate_size": 384}, "has shape [256, 128] but the config implies [384, 128]"),
    ({"num_hidden_layers": 4}, "lacks 9 tensors that its config implies (first: 'layers.3.input_layernorm.weight')"),
    ({"mlp_bias": True}, "lacks 9 tensors"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "'llama3': {'low_freq_factor'}"),
    ({"rope_scaling": {"rope_type": "longrope-v2", "factor": 2.0}}, "rope type 'longrope-v2' is not supported"),
], ids=["wrong-shape", "missing-layers", "missing-biases", "rope-field-missing", "rope-unknown"])
def test_a_checkpoint_that_does_not_match_its_config_is_refused_in_one_line(
    checkpoint: Path, tmp_path: Path, change: dict, expected: str
) -> None:
    config = {**json.loads((checkpoint / "config.json").read_text()), **change}
    code, output = _run_peer(_copy(checkpoint, tmp_path / "edited", config))
    assert code == 2, output
    line = _one_line(output)
    assert f"brigade peer: cannot serve {tmp_path / 'edited'}: " in line and expected in line, output


def test_a_folder_without_weights_is_refused_in_one_line(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoint / "config.json").read_text())
    code, output = _run_peer(folder)
    assert code == 2, output
    assert "has neither model.safetensors nor model.safetensors.index.json" in _one_line(output)


def test_a_missing_folder_or_config_is_named(checkpoint: Path, tmp_path: Path) -> None:
    code, output = _run_peer(tmp_path / "no-such-folder")
    assert code == 2 and "no folder" in output and "Hugging Face repo id" in output, output
    (tmp_path / "empty").mkdir()
    code, output = _run_peer(tmp_path / "empty")
    assert code == 2 and "has no config.json" in output, output


def test_a_checkpoint_holding_only_its_own_shards_is_served(tmp_path: Path) -> None:
    """A volunteer keeps only the shards of its layers: the index names the others, which are not here."""
    folder = build_checkpoint(RealConfig.load("tinyllama-1.1b"), tmp_path / "sharded", shard_size="1MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    kept = {file for name, file in index.items() if ".layers.0." in name or not name.startswith("model.layers.")}
    for file in set(index.values()) - kept:
        (folder / file).unlink()
    from brigade.kernels.loading import check_checkpoint, load_config, load_span

    check_checkpoint(str(folder), load_config(str(folder)))  # names all checked, shapes where the files are
    assert load_span(str(folder), 0, 1).end == 1


def test_a_malformed_or_unreachable_initial_peer_ends_the_peer_with_one_line(checkpoint: Path) -> None:
    code, output = _run_peer(checkpoint)
    assert code == 1, output
    assert "'/ip4/127.0.0.1/tcp/9/p2p/QmNone' is not a multiaddr" in _one_line(output)
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/QmXH6f5Y2zbFdNeAkQjT2eUuBx7s5c2bJsBd1p7ZqW5Wv4"  # well formed, not listening
    code, output = _run_peer(checkpoint, initial=nobody)
    assert code == 1, output
    assert "could not start the DHT node" in _one_line(output) or "did not start within" in output


def test_a_budget_too_small_for_one_layer_ends_the_peer_with_one_line(checkpoint: Path, tmp_path: Path) -> None:
    with LocalSwarm(tmp_path / "swarm") as swarm:
        initial = swarm.start_bootstrap()
        code, output = _run_peer(checkpoint, "--max-memory", "1MiB", initial=initial[0])
    assert code == 1, output
    line = _one_line(output)
    assert f"brigade peer: cannot serve {checkpoint}: not even one layer fits" in line, output
    assert "raise the budget" in line
