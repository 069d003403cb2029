"""One swarm for the security tests: three real peer processes of the tiny Llama, each hosting all 6 layers.

- ``guard``: TLS, its identity in a key file it creates (``guard_key``), a small KV cache pool (4096
  positions, so a squatter's 25% share is 16 pages), default message/tensor/session caps, and a client
  blocklist naming ``blocked_key``'s identity;
- ``twin``: TLS, defaults (a second route for the same layers, for allowlists and failover);
- ``plain``: ``--insecure`` (plain-text gRPC: the control of the wire-capture test; clients that do
  not allow insecure peers never route to it).

Package-scoped: started once for every module here, stopped after the last one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from brigade_security import GUARD_CACHE_TOKENS, SecuritySwarm
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS

from brigade.deploy.launcher import LocalSwarm
from brigade.protocol.identity import Identity


@pytest.fixture(scope="package")
def security_swarm(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuritySwarm]:
    folder = tmp_path_factory.mktemp("security-swarm")
    blocked_key = folder / "blocked-client.key"
    blocked = Identity.load_or_create(blocked_key)
    guard_key = folder / "keys" / "guard.key"  # created by the guard on its first run
    swarm = LocalSwarm(folder / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        model = str(llama_checkpoint)
        guard = swarm.add_peer(model, (0, 6), wait=False, extra_args=[
            *FAST_PEER_ARGS, "--cache-tokens", str(GUARD_CACHE_TOKENS), "--block-client", blocked.peer_id,
            "--identity", str(guard_key)])
        twin = swarm.add_peer(model, (0, 6), wait=False, extra_args=FAST_PEER_ARGS)
        plain = swarm.add_peer(model, (0, 6), wait=False, extra_args=[*FAST_PEER_ARGS, "--insecure"])
        for peer in (guard, twin, plain):
            swarm.wait_ready(peer)
        yield SecuritySwarm(swarm, guard, twin, plain, blocked_key, llama_checkpoint, guard_key)
    finally:
        swarm.close()
