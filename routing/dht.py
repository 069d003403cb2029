"""Starting a hivemind DHT node for a peer, a client or the dashboard.

hivemind runs each DHT node in a forked child process (plus a Go ``p2pd`` daemon under it), so
starting one blocks for a fraction of a second to a few seconds. ``start_dht`` bounds that wait
and turns every way start-up can fail (unreachable or malformed initial peers, a daemon that
never comes up) into one ``RuntimeError`` that says what to check, instead of hivemind's mix of
daemon errors and, without a timeout, an unbounded wait.

Every node runs brigade's ``RecordValidator`` (``routing/validator.py``): a node refuses to store,
and drops from what others return, anything that is not an owner-signed brigade record. Client-mode
nodes skip its clock check (see the validator's docstring for why).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import hivemind

from brigade.routing.peer_filter import PeerFilter
from brigade.routing.validator import RecordValidator

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)



class DhtStartError(RuntimeError):
    """The DHT node could not start or join: initial peers unreachable, a bad multiaddr, a port in use."""


def check_multiaddrs(addresses: Sequence[str]) -> None:
    """Refuses a malformed multiaddr by name before a daemon is started for it (its own error says less)."""
    from hivemind.utils.multiaddr import Multiaddr

    for address in addresses:
        try:
            Multiaddr(address)
        except Exception as e:
            raise DhtStartError(f"{address!r} is not a multiaddr ({e}); copy the one `brigade dht` prints, "
                                "such as /ip4/1.2.3.4/tcp/31337/p2p/Qm...") from e

def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    listen_maddrs: Sequence[str] = DEFAULT_LISTEN,
    client_mode: bool = False,
    identity_path: str | None = None,
    startup_timeout_s: float = 30.0,
    peer_filter: PeerFilter | None = None,
) -> hivemind.DHT:
    """Starts a DHT node (in a child process) and returns it once it serves requests.

    ``initial_peers`` are multiaddrs with a ``/p2p/<id>`` part, as printed by ``visible_maddrs``;
    none starts a new swarm. ``client_mode`` nodes only ask and never store for others: clients
    behind NAT and the dashboard use it. ``identity_path`` is hivemind's libp2p key file (not
    brigade's Ed25519 identity): it keeps the DHT peer id, hence the multiaddr that others
    bootstrap from, the same across restarts; hivemind creates the file when it is missing, and
    we create its folder. ``peer_filter`` makes the node store and read only the records of the
    peers it admits (a private swarm: give every node of it the same filter). The caller owns the
    result and must call ``dht.shutdown()``.

    Blocks the calling thread; from async code run it with ``asyncio.to_thread``.
    Raises RuntimeError when the node does not come up within ``startup_timeout_s``.
    """
    check_multiaddrs([*initial_peers, *listen_maddrs])
    if identity_path is not None:
        Path(identity_path).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + startup_timeout_s
    attempts = 2  # a child that hangs right after fork (see _fork_child) is replaced once
    for attempt in range(attempts):
        dht = hivemind.DHT(
            initial_peers=list(initial_peers) or None,
            host_maddrs=list(listen_maddrs),
            client_mode=client_mode,
            identity_path=identity_path,
            startup_timeout=startup_timeout_s,  # bounds the p2pd daemon's own start inside the child
            record_validators=[RecordValidator(peer_filter=peer_filter, check_clock=not client_mode)],
            start=False,
        )
        remaining = deadline - time.monotonic()
        wait_s = remaining if attempt == attempts - 1 else max(remaining / 2, min(remaining, 10.0))
        try:
            _fork_child(dht)
            # hivemind.DHT(start=True) would wait without a deadline; the same start, bounded.
            dht.wait_until_ready(timeout=wait_s)
            break
        except TimeoutError as e:
            dht.shutdown()
            if attempt + 1 < attempts and deadline - time.monotonic() > 1.0:
                logger.warning("the DHT node did not start within %.0f s; starting a new one", wait_s)
                continue
            raise DhtStartError(
                f"the DHT node did not start within {startup_timeout_s:.0f} s; check that the initial peers "
                f"{list(initial_peers)} are reachable from this machine"
            ) from e
        except Exception as e:
            dht.shutdown()
            if initial_peers:
                hint = f"check that the initial peers {list(initial_peers)} are running and reachable"
            else:
                hint = f"check the listen addresses {list(listen_maddrs)}"
            raise DhtStartError(f"could not start the DHT node ({e}); {hint}") from e
    logger.info("DHT node started (client_mode=%s), visible at %s", client_mode, visible_maddrs(dht))
    return dht


def _fork_child(dht: hivemind.DHT) -> None:
    """Forks the DHT's process with the garbage collector's view of this process frozen.

    hivemind's DHT is a forked process. A client or a test forks it from a process full of gRPC
    channels, threads and torch state; if the child's garbage collector then finalizes one of
    those inherited objects (a gRPC call, say), it runs foreign finalizers in a half-copied process
    and can crash or hang there. Freezing moves every object that exists at fork time out of the
    collector's reach in the child (the parent unfreezes at once), so the child only ever collects
    what it made itself.
    """
    gc.freeze()
    try:
        dht.start()
    finally:
        gc.unfreeze()


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The multiaddrs others can bootstrap from, as strings to print or pass on the command line."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]
