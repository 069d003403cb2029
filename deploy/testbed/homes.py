"""Home routers on the testbed: a peer behind NAT that can connect out but accepts nothing in.

A home is two namespaces. The router sits on the testbed's bridge like any host (its address is
the home's public address, and its link carries the home's shaped round trip); the peer's host
sits behind it on a LAN of its own (``192.168.<n>.0/24``), with the router as its default
gateway. nftables in the router masquerades what leaves for the bridge, forwards only replies
back in, and drops every new connection that arrives from outside: exactly what a volunteer's
home router does to a peer that nobody forwarded a port to.

As in ``netns.py``, the commands are built by pure functions so they can be read and tested
without root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass

from brigade.deploy.testbed.netns import PREFIX, Host, TestbedError, run_command

NAT_TABLE = "brigade_home"
WAN = "eth0"  # the router's link to the bridge (named by netns.network_commands)
LAN = "lan0"  # the router's link to the home's host


@dataclass(frozen=True)
class Home:
    router: Host  # on the bridge: its address is the home's public address
    host: Host  # behind the router; ``address`` is its LAN address, ``hub_link`` is empty
    lan_subnet: str  # first three octets of the home's LAN

    @property
    def gateway(self) -> str:
        return f"{self.lan_subnet}.1"


def plan_home(router: Host, role: str, index: int, run_id: str) -> Home:
    """The home of peer ``role`` behind ``router`` (already planned on the bridge); LANs 192.168.(100 + index)."""
    if not 0 <= index < 150:
        raise ValueError("at most 150 homes on one testbed")
    subnet = f"192.168.{100 + index}"
    host = Host(role, f"{run_id}-{role}", f"{subnet}.2", "", router.rtt_ms)
    return Home(router, host, subnet)


def home_commands(home: Home) -> list[list[str]]:
    """The ``ip`` calls that make the home's namespace, its LAN link to the router, and its routes."""
    router, host = home.router.namespace, home.host.namespace
    return [
        ["ip", "netns", "add", host],
        ["ip", "-n", router, "link", "add", "dev", LAN, "type", "veth", "peer", "name", "eth0", "netns", host],
        ["ip", "-n", router, "addr", "add", f"{home.gateway}/24", "dev", LAN],
        ["ip", "-n", router, "link", "set", "dev", LAN, "up"],
        ["ip", "-n", host, "link", "set", "dev", "lo", "up"],
        ["ip", "-n", host, "addr", "add", f"{home.host.address}/24", "dev", "eth0"],
        ["ip", "-n", host, "link", "set", "dev", "eth0", "up"],
        ["ip", "-n", host, "route", "add", "default", "via", home.gateway],
        ["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
    ]


def nat_commands(namespace: str) -> list[list[str]]:
    """nftables in the router: masquerade outgoing, let replies back in, drop every new connection from outside."""
    nft = ["ip", "netns", "exec", namespace, "nft"]
    return [
        [*nft, "add", "table", "ip", NAT_TABLE],
        [*nft, "add", "chain", "ip", NAT_TABLE, "postrouting", "{ type nat hook postrouting priority srcnat ; }"],
        [*nft, "add", "rule", "ip", NAT_TABLE, "postrouting", "oifname", WAN, "masquerade"],
        [*nft, "add", "chain", "ip", NAT_TABLE, "forward",
         "{ type filter hook forward priority filter ; policy drop ; }"],
        [*nft, "add", "rule", "ip", NAT_TABLE, "forward", "iifname", LAN, "oifname", WAN, "accept"],
        [*nft, "add", "rule", "ip", NAT_TABLE, "forward", "iifname", WAN, "oifname", LAN,
         "ct", "state", "established,related", "accept"],
        [*nft, "add", "chain", "ip", NAT_TABLE, "input", "{ type filter hook input priority filter ; policy drop ; }"],
        [*nft, "add", "rule", "ip", NAT_TABLE, "input", "ct", "state", "established,related", "accept"],
        [*nft, "add", "rule", "ip", NAT_TABLE, "input", "iifname", "lo", "accept"],
        [*nft, "add", "rule", "ip", NAT_TABLE, "input", "iifname", LAN, "accept"],
    ]


def build_home(home: Home) -> None:
    """Makes the home (its router must exist already, on the bridge)."""
    for argv in [*home_commands(home), *nat_commands(home.router.namespace)]:
        run_command(argv)


def nat_available() -> str | None:
    """None when this machine can make a home router (nft masquerade in a namespace), else why not."""
    if os.geteuid() != 0:
        return "home routers need root (network namespaces, nftables)"
    if shutil.which("nft") is None:
        return "home routers need the nft command (Debian: apt-get install nftables)"
    probe = f"{PREFIX}probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        run_command(["ip", "netns", "add", probe])
    except TestbedError as e:
        return f"cannot create a network namespace here: {e}"
    try:
        for argv in nat_commands(probe)[:3]:
            run_command(argv)
    except TestbedError as e:
        return f"nftables masquerade does not work in a network namespace here: {e}"
    finally:
        with contextlib.suppress(TestbedError):
            run_command(["ip", "netns", "del", probe])
    return None
