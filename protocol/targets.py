"""Which addresses a swarm member may be made to dial, and whether its swarm is a private one.

Addresses reach a peer or the dashboard from other people: signed records (anyone can sign one),
probe requests, the relay a record names. A member that dials whatever it is told is a port
scanner of the network it sits in (a volunteer's home LAN, a cloud's metadata service). So a
dial made on someone else's word goes only to public (globally routable) addresses, unless the
swarm is configured **private**: a LAN or test swarm whose members themselves live on private or
loopback addresses. Link-local addresses (a cloud's metadata service at 169.254.169.254) are never
dialed on another's word, private swarm or not.

A swarm is private when its operator says so (``--private-swarm``), or, by default, when the
process joins it only through private or loopback addresses (every ``--initial-peers`` multiaddr,
or with none, the address it binds): a test swarm on 127.0.0.1 is private, a volunteer joining the
public swarm through public bootstrap nodes is not. Nothing an outsider sends can change it.

DNS names are resolved here (bounded) and the dial is pinned to a resolved public IP, so a name
that resolves to a private address, or rebinds to one between check and connect, is refused too.
Peers are pinned by certificate, not by host name, so dialing the IP loses nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable

from brigade.protocol.records import PeerRecord, parse_address

RESOLVE_TIMEOUT_S = 2.0  # a DNS lookup for a dial target

logger = logging.getLogger(__name__)
_hinted = False  # the operator is told about --private-swarm once per process, in its own log


def _refuse_private(address: str) -> ForbiddenTargetError:
    """The coarse error for a caller, and (once) a hint in the local log for the operator."""
    global _hinted
    if not _hinted:
        _hinted = True
        logger.warning("refused to dial %s: not a public address. If this swarm runs on a LAN or in a private "
                       "network, start every member with --private-swarm", address)
    return ForbiddenTargetError("not a public address (this swarm is not configured private)")


class ForbiddenTargetError(ConnectionError):
    """The address is not one this process dials on another's word (its message is coarse on purpose)."""


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not private, loopback, link-local, multicast, reserved or unspecified."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def is_link_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """169.254.0.0/16 and fe80::/10: never a swarm member's address, but where clouds keep their
    metadata service (169.254.169.254), so refused even in a private swarm."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def dial_target(address: str, *, allow_private: bool, timeout_s: float = RESOLVE_TIMEOUT_S) -> str:
    """The "host:port" to dial for ``address``: itself when allowed, else pinned to a public IP.

    Raises ForbiddenTargetError when ``address`` is not host:port, or (outside a private swarm)
    when it names or resolves to a non-public address, or its name does not resolve in time.
    """
    parsed = parse_address(address)
    if parsed is None:
        raise ForbiddenTargetError("not a host:port address")
    host, port = parsed
    literal = _ip(host)
    if literal is not None and is_link_local(literal):
        raise ForbiddenTargetError("a link-local address (never dialed on another's word)")
    if allow_private:
        return address
    if literal is not None:
        if not is_public(literal):
            raise _refuse_private(address)
        return address
    try:
        async with asyncio.timeout(timeout_s):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError) as error:
        raise ForbiddenTargetError("the host name does not resolve") from error
    resolved = [ip for info in infos if (ip := _ip(str(info[4][0]))) is not None]
    if not resolved or not all(is_public(ip) for ip in resolved):
        raise _refuse_private(address)
    return _join(str(resolved[0]), port)


def literal_allowed(address: str, *, allow_private: bool) -> bool:
    """A cheap synchronous check: False when ``address`` is an IP literal that is not public (names pass)."""
    parsed = parse_address(address)
    if parsed is None:
        return False
    ip = _ip(parsed[0])
    if ip is not None and is_link_local(ip):
        return False
    return allow_private or ip is None or is_public(ip)


def dialable(records: list[PeerRecord], *, allow_private: bool) -> list[PeerRecord]:
    """The records whose address this process may dial on their signer's word (IP literals checked;
    names are checked when dialed through ``dial_target``)."""
    return [record for record in records if literal_allowed(record.address, allow_private=allow_private)]


def _multiaddr_host(maddr: str) -> str | None:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") else None


def joins_privately(initial_peers: Iterable[str], bind_hosts: Iterable[str]) -> bool:
    """The default of ``private_swarm``: every way in (initial peers, else bound hosts) is non-public.

    Host names count as public (a DNS bootstrap node is how the public swarm is joined).
    """
    hosts = [host for maddr in initial_peers if (host := _multiaddr_host(maddr)) is not None]
    if not hosts:
        hosts = [host for host in bind_hosts if host not in ("", "0.0.0.0", "::", "[::]")]
        if not hosts:
            return False
    return all((ip := _ip(host)) is not None and not is_public(ip) for host in hosts)
