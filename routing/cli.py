"""`brigade dht`: run a bootstrap DHT node that peers and clients join."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Annotated

import typer

READY_MARK = "BRIGADE_DHT_READY"


def dht(
    initial_peers: Annotated[list[str] | None, typer.Option("--initial-peers", help="Join an existing swarm.")] = None,
    listen: Annotated[list[str] | None, typer.Option(help="Multiaddr(s) to listen on.")] = None,
    identity: Annotated[str | None, typer.Option(help="libp2p key file: the same peer id across restarts.")] = None,
    allow_peers: Annotated[str | None, typer.Option(
        help="File of brigade peer ids, one per line: store and serve only their records (a private swarm).")] = None,
    block_peers: Annotated[str | None, typer.Option(
        help="File of brigade peer ids, one per line: never store or serve their records.")] = None,
) -> None:
    """Start a DHT node, print the multiaddrs to give to others, and run until interrupted."""
    import json

    from brigade.routing.dht import DEFAULT_LISTEN, start_dht, visible_maddrs
    from brigade.routing.peer_filter import PeerFilter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        peer_filter = PeerFilter.from_files(allow_peers, block_peers)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    node = start_dht(initial_peers or (), listen_maddrs=listen or DEFAULT_LISTEN, identity_path=identity,
                     peer_filter=peer_filter)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    maddrs = visible_maddrs(node)
    print("DHT node running. Give peers and clients:", flush=True)
    for maddr in maddrs:
        print(f"  --initial-peers {maddr}", flush=True)
    print(f"{READY_MARK} {json.dumps({'maddrs': maddrs})}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.shutdown()
