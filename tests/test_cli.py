"""The one `brigade` command exposes every subcommand with the options the README documents."""

from __future__ import annotations

import subprocess
import sys

import pytest

EXPECTED_OPTIONS = {
    ("dht",): ["--initial-peers", "--identity"],
    ("peer", "run"): ["--layers", "--initial-peers", "--port", "--dtype", "--device", "--quant", "--max-memory",
                      "--reachability", "--relay", "--relay-port", "--relay-max-bytes",
                      "--allow-peers", "--block-peers", "--allow-client", "--block-client"],
    ("generate",): ["--initial-peers", "--max-new-tokens", "--do-sample", "--temperature", "--top-k", "--top-p",
                    "--draft-model", "--draft-tokens", "--allow-peers", "--block-peers", "--identity"],
    ("demo",): ["--prompt", "--peers", "--max-new-tokens"],
    ("serve",): ["--initial-peers", "--host", "--port", "--api-key"],
}


@pytest.mark.parametrize("command", sorted(EXPECTED_OPTIONS))
def test_subcommand_help_lists_its_options(command: tuple[str, ...]) -> None:
    result = subprocess.run([sys.executable, "-m", "brigade", *command, "--help"], capture_output=True, text=True,
                            timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    for option in EXPECTED_OPTIONS[command]:
        assert option in result.stdout, f"`brigade {' '.join(command)}` lacks {option}"


def test_bad_layers_are_refused_before_anything_starts() -> None:
    result = subprocess.run([sys.executable, "-m", "brigade", "peer", "run", "m", "--layers", "8:4",
                             "--initial-peers", "x"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "START < END" in result.stdout + result.stderr


@pytest.mark.parametrize("command", [["peer", "run", "m", "--layers", "0:2"], ["generate", "m", "hello"]])
def test_peer_lists_with_a_typo_are_refused_before_anything_starts(command: list[str], tmp_path) -> None:
    listed = tmp_path / "peers.txt"
    listed.write_text("# members\nbpNotAPeer-Id\n")
    result = subprocess.run([sys.executable, "-m", "brigade", *command, "--initial-peers", "x",
                             "--allow-peers", str(listed)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not brigade peer ids" in result.stdout + result.stderr
