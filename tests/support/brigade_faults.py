"""Swarms of honest and faulty peers for the peer-fault tests: one layout, one start.

A faulty peer announces a high throughput so that every route wants it; honest ones announce a
low one, so a test shows the client routing around a peer it would otherwise prefer.
"""

from __future__ import annotations

from pathlib import Path

from brigade_evil_peer import evil_entry
from brigade_testkit import FAST_PEER_ARGS

from brigade.deploy.launcher import LaunchedProcess, LocalSwarm

FAST = [*FAST_PEER_ARGS, "--throughput", "5000"]  # what a peer that wants every route announces
SLOW = [*FAST_PEER_ARGS, "--throughput", "100"]


def start_layout(swarm: LocalSwarm, checkpoint: Path,
                 layout: list[tuple[tuple[int, int], str | None]]) -> list[LaunchedProcess]:
    """Starts one peer per (span, cheat) — honest where cheat is None — and waits for all of them."""
    peers = [swarm.add_peer(str(checkpoint), span, extra_args=FAST if cheat else SLOW, wait=False,
                            **({"entry": evil_entry(cheat)} if cheat else {}))
             for span, cheat in layout]
    for peer in peers:
        swarm.wait_ready(peer)
    return peers


def peer_id(peer: LaunchedProcess) -> str:
    return str(peer.info["peer_id"])
