"""Is this peer reachable? Asking other swarm members to dial it back (docs/relays.md).

A peer cannot see its own router from inside, so it asks: ``Probe`` (a small gRPC call on the
other peer's port) says "dial me back at this address and tell me". The prober connects,
completes TLS pinned to the requester's certificate and checks that ``Info`` answers with the
requester's peer id, so a verdict of "reachable" means a real client would get through to this
very peer, not to something else listening on that port.

A prober dials only the IP address the request came from (like libp2p's AutoNAT): the probe
cannot be used to make swarm members connect to third parties or scan their networks. A peer that
announces another address than the one its connections leave from (its LAN address behind a
router, say) is told so, which is exactly the advice it needs. Outside a private swarm
(``protocol/targets.py``) the source must also be a public address: a request from the prober's
own loopback is refused, since relayed connections (``peer/relayed.py``) arrive from there and
would otherwise turn the prober into a scanner of its own network. In a private swarm (a LAN, a
test swarm, the testbed's delay proxies) a loopback source means a local TCP proxy in front of
the prober, which hides the real source; then the prober dials the announced address as given.
Either way it reports only "reachable" or a coarse reason, never banners or error texts.

The verdict is the majority of the probers that answered (a tie counts as unreachable: a relayed
peer works for everyone, a wrongly direct one fails every client); no answer at all is "unknown"
(the swarm's first peer has nobody to ask) and is checked again later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass

import grpc

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import InsecurePeerError, dial, peer_channel
from brigade.protocol.errors import InvalidTokenError
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, newest_per_peer, parse_address
from brigade.protocol.targets import is_public
from brigade.protocol.tls import TlsPinError
from brigade.protocol.tokens import TokenVerifier, make_token

logger = logging.getLogger(__name__)

PROBE_PURPOSE = "probe"
DEFAULT_PROBE_TIMEOUT_S = 3.0  # how long a prober tries to connect back
MAX_PROBE_TIMEOUT_S = 5.0  # the most a prober grants, whatever the request asks
MAX_PROBERS = 3  # peers asked at once
_RPC_SLACK_S = 2.0  # the Probe call's own deadline beyond the dial-back's


def probe_binding(address: str, tls_cert: str) -> bytes:
    """What a probe token signs: the address and certificate to check, so a token cannot be moved."""
    return address.encode() + b"\0" + tls_cert.encode()


def observed_host(peer: str) -> str | None:
    """The IP in a gRPC ``context.peer()`` ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"), IPv4-mapped IPv6 as IPv4."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _same_ip(host: str, observed: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(observed)
    except ValueError:
        return False


def _ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _resolves_to(host: str, observed: str, timeout_s: float) -> bool:
    """Whether DNS name ``host`` has ``observed`` among its addresses (bounded; False on any failure)."""
    try:
        async with asyncio.timeout(timeout_s):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return False
    return any(_same_ip(str(info[4][0]), observed) for info in infos)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def probe_target(address: str, observed: str, *, allow_private: bool = False) -> str | None:
    """What a prober dials for a request from ``observed`` announcing ``address``; None: refuse (or
    resolve first, when the announced host is a DNS name).

    The observed IP with the announced port when the announced host is that IP; in a private swarm,
    the announced address as given when the request came from this machine's loopback (a local
    proxy in front of the prober hides the real source). Outside one, only a public source is dialed.
    """
    parsed = parse_address(address)
    if parsed is None or not observed:
        return None
    host, port = parsed
    if not allow_private:
        ip = _ip_or_none(observed)
        if ip is None or not is_public(ip):
            return None
    elif _is_loopback(observed):
        return address
    return _join(observed, port) if _same_ip(host, observed) else None


class ProbeService(pb_grpc.ReachabilityServicer):
    """Answers other peers' probes: dial back, check, report. Never more than ``max_concurrent`` at once."""

    def __init__(self, peer_id: str, *, allow_insecure: bool = False, allow_private: bool = False,
                 max_concurrent: int = 4,
                 default_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, max_timeout_s: float = MAX_PROBE_TIMEOUT_S):
        self.peer_id = peer_id
        self.allow_insecure = allow_insecure
        self.allow_private = allow_private  # a private swarm: loopback/LAN sources are dialed too
        self.max_concurrent = max_concurrent
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.tokens = TokenVerifier(peer_id)
        self._busy = 0

    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeResponse:
        try:
            requester = self.tokens.verify(request.token if request.HasField("token") else None, PROBE_PURPOSE,
                                           probe_binding(request.address, request.tls_cert))
        except InvalidTokenError as error:
            await context.abort(error.status, str(error))
        observed = observed_host(context.peer()) or ""
        parsed = parse_address(request.address)
        if parsed is None:
            return pb.ProbeResponse(detail="the address is not host:port", observed_host=observed)
        host, port = parsed
        if not request.tls_cert and not self.allow_insecure:  # this peer's policy, not the requester's reachability
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this peer does not dial plain-text peers")
        if self._busy >= self.max_concurrent:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many probes at once; ask another peer")
        timeout_s = min(request.timeout_s or self.default_timeout_s, self.max_timeout_s)
        self._busy += 1
        try:
            target = probe_target(request.address, observed, allow_private=self.allow_private)
            source_ok = self.allow_private or ((ip := _ip_or_none(observed)) is not None and is_public(ip))
            if target is None and source_ok and await _resolves_to(host, observed, timeout_s):
                target = _join(observed, port)
            if target is None:
                detail = (f"announces {host} but its connections come from {observed or 'an unknown address'}; "
                          f"a probe only dials the address a request came from") if source_ok else (
                          "a probe dials only a public address a request came from (this swarm is not private)")
                return pb.ProbeResponse(detail=detail, observed_host=observed)
            reachable, detail, rtt_ms = await dial_back(target, request.tls_cert, requester, timeout_s,
                                                        allow_insecure=self.allow_insecure)
        finally:
            self._busy -= 1
        return pb.ProbeResponse(reachable=reachable, detail=detail, observed_host=observed, rtt_ms=rtt_ms)


async def dial_back(address: str, tls_cert: str, expected_peer_id: str, timeout_s: float, *,
                    allow_insecure: bool = False) -> tuple[bool, str, float]:
    """(reachable, why not, round trip ms): connect to ``address`` pinned to ``tls_cert``, check who answers."""
    try:
        channel = dial(address, tls_cert, allow_insecure=allow_insecure)
    except (InsecurePeerError, TlsPinError) as error:
        logger.debug("probe of %s not dialed: %r", address, error)
        return False, "the certificate cannot be dialed", 0.0
    began = time.perf_counter()
    try:
        info = await pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        # Only a coarse reason goes back: the details (OpenSSL's words, a service's banner) stay here.
        logger.debug("probe of %s failed: %s %s", address, error.code(), error.details())
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return False, f"no connection within {timeout_s:.1f} s (incoming connections are dropped)", 0.0
        return False, f"no brigade peer answered ({error.code().name})", 0.0
    finally:
        await channel.close()
    rtt_ms = (time.perf_counter() - began) * 1000
    if info.peer_id != expected_peer_id:
        return False, f"another peer answers there ({info.peer_id[:64]})", rtt_ms
    return True, "", rtt_ms


@dataclass(frozen=True)
class ProbeResult:
    prober_id: str
    answered: bool  # the prober gave a verdict (False: it could not be asked)
    reachable: bool
    detail: str
    observed_host: str = ""


@dataclass(frozen=True)
class Verdict:
    reachable: bool | None  # None: nobody could be asked (or not checked)
    address: str  # the address that was checked
    results: tuple[ProbeResult, ...] = ()
    reason: str = ""  # set when the verdict was not measured (--reachability direct | relayed)

    @property
    def answered(self) -> list[ProbeResult]:
        return [result for result in self.results if result.answered]

    def observed_hosts(self) -> list[str]:
        return sorted({result.observed_host for result in self.answered if result.observed_host})

    def summary(self) -> str:
        if self.reason:
            return self.reason
        answered = self.answered
        if not answered:
            asked = len(self.results)
            return f"unknown: {'no other peer to ask yet' if not asked else f'none of {asked} peers answered'}"
        yes = sum(result.reachable for result in answered)
        reasons = sorted({result.detail for result in answered if not result.reachable and result.detail})
        text = f"{yes} of {len(answered)} peers could connect to {self.address}"
        return text + (f" ({'; '.join(reasons)})" if reasons and yes < len(answered) else "")


def decide(results: list[ProbeResult]) -> bool | None:
    """Majority of the probers that answered; a tie is unreachable; no answer is unknown (None)."""
    answered = [result for result in results if result.answered]
    if not answered:
        return None
    return 2 * sum(result.reachable for result in answered) > len(answered)


def choose_probers(records: list[PeerRecord], self_id: str, rng: random.Random,
                   limit: int = MAX_PROBERS) -> list[PeerRecord]:
    """Up to ``limit`` online peers reachable directly (a relayed prober would see its relay's address)."""
    newest = newest_per_peer(records)
    candidates = [record for record in newest.values()
                  if record.peer_id != self_id and record.state == "online" and not record.relay_peer_id
                  and record.reachable is not False]
    rng.shuffle(candidates)
    return candidates[:limit]


async def ask(identity: Identity, prober: PeerRecord, address: str, tls_cert: str, timeout_s: float, *,
              allow_insecure: bool = False) -> ProbeResult:
    """One probe: ``prober`` dials ``address`` back; any failure to ask is an unanswered result."""
    try:
        channel = peer_channel(prober, allow_insecure=allow_insecure)
    except (InsecurePeerError, TlsPinError) as error:
        return ProbeResult(prober.peer_id, False, False, str(error))
    token = make_token(identity, prober.peer_id, PROBE_PURPOSE, probe_binding(address, tls_cert))
    try:
        response = await pb_grpc.ReachabilityStub(channel).Probe(
            pb.ProbeRequest(address=address, tls_cert=tls_cert, token=token, timeout_s=timeout_s),
            timeout=timeout_s + _RPC_SLACK_S)
    except grpc.aio.AioRpcError as error:
        logger.debug("probe by %s failed: %s %s", prober.peer_id, error.code(), error.details())
        return ProbeResult(prober.peer_id, False, False, f"{error.code().name}: {(error.details() or '')[:200]}")
    finally:
        await channel.close()
    return ProbeResult(prober.peer_id, True, response.reachable, response.detail[:300], response.observed_host[:64])


async def check_reachability(identity: Identity, address: str, tls_cert: str, records: list[PeerRecord], *,
                             timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, allow_insecure: bool = False,
                             rng: random.Random | None = None) -> Verdict:
    """Asks up to ``MAX_PROBERS`` peers at once; takes at most ``timeout_s`` plus one RPC's slack."""
    probers = choose_probers(records, identity.peer_id, rng or random.Random())
    results = await asyncio.gather(*(ask(identity, prober, address, tls_cert, timeout_s,
                                         allow_insecure=allow_insecure) for prober in probers))
    return Verdict(decide(list(results)), address, tuple(results))


def advice(verdict: Verdict, *, bound_port: int, announce_host: str, announce_port: int) -> str:
    """What to tell the volunteer, in plain words, when this peer cannot be reached directly."""
    seen = verdict.observed_hosts()
    lines = [
        f"Incoming connections to {_join(announce_host, announce_port)} do not get through, most likely "
        f"because a home router (NAT) or a firewall blocks them.",
        f"To serve directly: forward TCP port {announce_port} on your router to port {bound_port} of this "
        f"machine and allow it in its firewall.",
    ]
    public = [host for host in seen if not _same_ip(announce_host, host) and not _is_loopback(host)]
    if public:
        lines.append(f"Other peers see this machine as {', '.join(public)}: start with "
                     f"--announce-host {public[0]} --announce-port {announce_port} once the port is forwarded.")
    lines.append("Until then this peer serves through a relay (one more network hop, so a little slower).")
    return "\n  ".join(lines)
