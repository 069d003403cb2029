"""The security tests' swarm, as its fixture (``tests/security/conftest.py``) hands it to tests, and
what several of those tests measure (a peer process's memory)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brigade.client.config import ClientConfig
from brigade.client.remote import RemoteSwarm
from brigade.deploy.launcher import LaunchedProcess, LocalSwarm
from brigade.protocol.records import PeerRecord

GUARD_CACHE_TOKENS = 4096  # the guard peer's KV cache pool, in positions


@dataclass
class SecuritySwarm:
    swarm: LocalSwarm
    guard: LaunchedProcess
    twin: LaunchedProcess
    plain: LaunchedProcess
    blocked_key: Path  # a client identity file that ``guard`` refuses
    checkpoint: Path
    guard_key: Path  # the guard's Ed25519 key file (``--identity``), created by the guard itself

    @property
    def initial_peers(self) -> list[str]:
        return self.swarm.initial_peers

    def peer_id(self, peer: LaunchedProcess) -> str:
        return str(peer.info["peer_id"])

    def read_records(self, **options: Any) -> tuple[RemoteSwarm, list[PeerRecord]]:
        """The records a client with ``options`` reads (after its allow/block lists), and its swarm view."""
        config = ClientConfig(initial_peers=tuple(self.initial_peers), **options)
        swarm = RemoteSwarm(config, str(self.guard.info["model_name"]), 6, hidden_size=64)

        async def read() -> list[PeerRecord]:
            await swarm.start()
            try:
                return await swarm.records(0.0)
            finally:
                await swarm.close()

        return swarm, asyncio.run(read())


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """A /proc/<pid>/status memory figure in bytes: VmRSS (resident now) or VmHWM (resident peak)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/{pid}/status")


def reset_peak_memory(pid: int) -> None:
    """Sets the process's VmHWM back to its current RSS (Linux clear_refs 5), so a later peak is ours."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
