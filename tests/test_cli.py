"""The one `brigade` command exposes every subcommand with the options the README documents."""

from __future__ import annotations

import subprocess
import sys

import pytest

EXPECTED_OPTIONS = {
    ("dht",): ["--initial-peers", "--identity"],
    ("peer", "run"): ["--layers", "--initial-peers", "--port", "--dtype", "--device", "--quant", "--max-memory",
                      "--reachability", "--relay", "--relay-port", "--relay-max-bytes"],
    ("generate",): ["--initial-peers", "--max-new-tokens", "--do-sample", "--temperature", "--top-k", "--top-p",
                    "--draft-model", "--draft-tokens"],
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
