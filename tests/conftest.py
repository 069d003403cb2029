"""Shared fixtures: tiny checkpoints and real local swarms (bootstrap DHT + peer processes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from brigade_testkit import build_checkpoint, start_swarm

from brigade.deploy.launcher import LocalSwarm


@pytest.fixture(scope="session")
def shared_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """One DHT bootstrap node for the many swarms of the parity tests (models are told apart by name,
    as in a real swarm); each test module starts and stops its own peers on it."""
    swarm = LocalSwarm(tmp_path_factory.mktemp("shared-bootstrap"))
    try:
        yield swarm.start_bootstrap()
    finally:
        swarm.close()


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def llama_swarm(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """Bootstrap node and three peers splitting the tiny Llama's 6 layers, shared by the whole run."""
    swarm = start_swarm(tmp_path_factory.mktemp("llama-swarm"), llama_checkpoint, [(0, 2), (2, 4), (4, 6)])
    yield swarm
    swarm.close()
