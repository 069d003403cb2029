"""A peer behind a home router, on the testbed: it finds out it is unreachable, serves through a relay,
and keeps serving when that relay dies mid-generation.

Hosts are network namespaces on a bridge, with internet-like links (25 to 80 ms round trips,
delay proxies). p0 and p1 host layers 0:3 and relay; p2 hosts 3:6 from behind its own router
(nftables masquerade, every new inbound connection dropped), announcing the router's public
address as a volunteer who forgot to forward the port would. The client is outside.

Needs root, network namespaces and nftables (skipped with the reason otherwise). Starts DHT nodes
and peer processes: run under the shared swarm lock.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from brigade_testkit import FAST_PEER_ARGS, build_checkpoint, build_model

from brigade.deploy.testbed import Testbed, TestbedConfig, namespaces_available
from brigade.deploy.testbed.homes import nat_available
from brigade.deploy.testbed.processes import HostProcess
from brigade.deploy.testbed.runner import PEER_PORT

_REASON = namespaces_available() or nat_available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"NAT testbed skipped: {_REASON}")

SEED = 5
PROMPT = [3, 141, 59, 26, 53, 58, 97]
RELAY_MOVE_BOUND_S = 10.0  # a relayed peer whose relay died is registered with another within this
RECOVERY_BOUND_S = 30.0  # the longest gap between two tokens when the relay dies mid-generation


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    folder = tmp_path_factory.mktemp("nat")
    checkpoint = build_checkpoint(folder / "tiny-llama", "llama", seed=SEED)
    config = TestbedConfig(model=str(checkpoint), spans=((0, 3), (0, 3), (3, 6)), profile="internet", seed=2,
                           home_peers=(2,), relays=(0, 1), peer_args=(*FAST_PEER_ARGS, "--drain-grace", "1"),
                           log_dir=str(folder / "logs"))
    with Testbed(config) as started:
        yield started


def _reference(new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = build_model("llama", seed=SEED).generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens,
                                                         do_sample=False)
    return out[0, len(PROMPT):].tolist()


def _connects(namespace: str, address: str, port: int) -> bool:
    """Whether a TCP connection from inside ``namespace`` to ``address:port`` succeeds within a second."""
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1.0).close()"
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", code], capture_output=True,
                            timeout=30)
    return result.returncode == 0


def _relays_of(peer: HostProcess) -> list[str]:
    """Every relay the peer registered with, in order, from its log."""
    return re.findall(r"registered with relay (\w+)", peer.log_path.read_text(errors="replace"))


def test_the_peer_behind_nat_knows_it_is_unreachable_and_serves_through_a_relay(testbed: Testbed) -> None:
    p0, p1, home_peer = testbed.peers
    home = testbed.home_of(2)
    assert home is not None
    client = testbed.network.host("client").namespace
    # The home is really closed: nothing outside gets in, while the home peer's own links work.
    assert not _connects(client, home.router.address, PEER_PORT)
    assert not _connects(client, home.host.address, PEER_PORT)
    assert _connects(home.host.namespace, p0.host.address, PEER_PORT)
    assert home_peer.info["reachable"] is False
    assert home_peer.info["relay_peer_id"] in (p0.info["peer_id"], p1.info["peer_id"])
    relay = p0 if home_peer.info["relay_peer_id"] == p0.info["peer_id"] else p1
    assert home_peer.info["announced_address"] == relay.info["relay_address"]
    log = home_peer.log_path.read_text(errors="replace")
    assert f"NOT reachable at {home.router.address}:{PEER_PORT}" in log
    assert f"forward TCP port {PEER_PORT} on your router" in log
    result = testbed.generate(prompt_ids=PROMPT, new_tokens=8)
    assert result.tokens == _reference(8)
    assert result.route[-1].startswith(str(home_peer.info["peer_id"]))


def test_the_relay_dies_mid_generation_and_the_peer_serves_again_through_the_other(testbed: Testbed) -> None:
    p0, p1, home_peer = testbed.peers
    relay_id = _relays_of(home_peer)[-1]
    relay, survivor = (p0, p1) if relay_id == p0.info["peer_id"] else (p1, p0)
    new_tokens = 40
    client = testbed.start_generation(prompt_ids=PROMPT, new_tokens=new_tokens)
    deadline = time.monotonic() + 120
    while testbed.tokens_so_far(client) < 8:
        assert client.alive() and time.monotonic() < deadline, client.log_tail()
        time.sleep(0.02)
    relay.kill()
    killed_at = time.monotonic()
    while _relays_of(home_peer)[-1] != survivor.info["peer_id"]:
        assert time.monotonic() - killed_at < RELAY_MOVE_BOUND_S, home_peer.log_tail()
        time.sleep(0.05)
    moved_s = time.monotonic() - killed_at
    result = testbed.finish_generation(client)
    assert result.tokens == _reference(new_tokens)  # failover replayed the sessions: nothing lost or repeated
    assert testbed.tokens_so_far(client) == new_tokens
    gap_s = max(later - earlier for earlier, later in zip(result.token_times_s, result.token_times_s[1:],
                                                            strict=False))
    print(f"relay killed after token 8: the home peer registered with the other relay after {moved_s:.2f} s; "
          f"longest gap between tokens {gap_s:.2f} s")
    assert gap_s < RECOVERY_BOUND_S
    assert result.route[-1].startswith(str(home_peer.info["peer_id"]))  # still served from behind the router
    assert str(relay.info["peer_id"]) not in " ".join(result.route)
