"""Probing peers: does each one answer its ``Info`` RPC, as itself, and how far away is it.

Every probe has one deadline for everything (connect, two calls, close), and at most
``concurrency`` run at once, so a crawl of thousands of peers, many of them dead or hanging, takes
a bounded time and never floods the machine with connections. A probe never raises: any failure
is an unreachable result with the reason.

The first call opens the connection; the round trip reported is the second call's, on the open
connection, because that is what a client pays per message (TCP and HTTP/2 set-up are paid once
per session, and would double the figure).

Records are anyone's to write, so a probe is a dial made on a stranger's word: outside a private
swarm only public addresses are dialed (``protocol/targets.py``; names resolved and pinned to a
public IP), and the error shown on the public page is one reason for every failure to answer,
never the text gRPC or OpenSSL gave, nor whether the port refused or stayed silent (which would tell
the world what answers at an address in someone's network). A private swarm shows the coarse kind.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import peer_channel
from brigade.protocol.records import PeerRecord
from brigade.protocol.targets import ForbiddenTargetError, dial_target

logger = logging.getLogger(__name__)

_MAX_INFO_BYTES = 64 * 1024  # an InfoResponse is a few hundred bytes; refuse to buffer a hostile giant
# A host name or IPv4 address, or a bracketed IPv6 address, then a port: nothing else is dialled.
_HOST_PORT = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):(?P<port>[0-9]{1,5})$"
)


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    rtt_ms: float | None = None
    error: str = ""
    state: str = ""  # "online" | "leaving", as the peer says now
    free_cache_tokens: int | None = None
    open_sessions: int | None = None


def address_problem(address: str) -> str:
    """Why ``address`` must not be dialled ('' when it is a plain host:port).

    Addresses come from anyone's records, and gRPC also accepts target schemes (``unix:``,
    ``vsock:``, ``dns:``...): the dashboard dials only TCP host:port, never a local socket a
    record names.
    """
    match = _HOST_PORT.match(address)
    if match is None:
        return "not a host:port address"
    if not 0 < int(match.group("port")) < 65536:
        return "port out of range"
    return ""


async def probe_peer(record: PeerRecord, timeout_s: float, *, allow_private: bool = False) -> ProbeResult:
    """Calls ``Info`` twice on one connection within ``timeout_s`` and checks who answered.

    ``allow_private``: the swarm is private, so loopback, LAN and link-local addresses are dialed too.
    """
    problem = address_problem(record.address)
    if problem:
        return ProbeResult(False, error=f"not probed: {problem}")
    try:
        address = await dial_target(record.address, allow_private=allow_private, timeout_s=timeout_s)
    except ForbiddenTargetError as error:
        return ProbeResult(False, error=f"not probed: {error}")
    if address != record.address:
        record = record.model_copy(update={"address": address})
    # Probing only reads Info, so a plain-text peer (a --insecure test swarm) is probed too; clients
    # still refuse it. A certificate in the record is pinned as everywhere else.
    channel = peer_channel(record, max_message_bytes=_MAX_INFO_BYTES, allow_insecure=True)
    try:
        async with asyncio.timeout(timeout_s):
            stub = pb_grpc.PeerStub(channel)
            await stub.Info(pb.InfoRequest(), timeout=timeout_s)
            began = time.perf_counter()
            info = await stub.Info(pb.InfoRequest(), timeout=timeout_s)
            rtt_ms = (time.perf_counter() - began) * 1000
    except TimeoutError:
        return _unreachable(f"no answer within {timeout_s:g} s", allow_private)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _unreachable(f"no answer within {timeout_s:g} s", allow_private)
        logger.debug("probe of %s failed: %s %s", record.peer_id, e.code(), _first_line(e.details()))
        return _unreachable(f"unreachable ({e.code().name})", allow_private)
    except Exception as e:  # a malformed address, a channel that cannot be built
        logger.debug("probe of %s failed: %r", record.peer_id, e)
        return ProbeResult(False, error="probe failed: the record cannot be dialed")
    finally:
        await _close(channel)
    # An address outlives its peer: another process (or another peer) may have its port now.
    if info.peer_id != record.peer_id:
        return ProbeResult(False, rtt_ms, error=f"answered as another peer ({info.peer_id[-8:] or 'no id'})")
    if info.model_name != record.model_name:
        return ProbeResult(False, rtt_ms, error=f"serves another model ({_first_line(info.model_name)})")
    return ProbeResult(
        True, rtt_ms, state=info.state, free_cache_tokens=int(info.free_cache_tokens),
        open_sessions=int(info.open_sessions),
    )


PUBLIC_UNREACHABLE = "unreachable (no valid answer)"


def _unreachable(detail: str, allow_private: bool) -> ProbeResult:
    """A failed probe as the page shows it. Outside a private swarm a record may name any public host,
    so the page must not tell a closed port (refused at once) from a filtered one (silent) or an open
    one that speaks something else: that would make the dashboard a port scanner for anyone who can
    write a record. One reason for all of them there; the detail is for a private swarm's operator."""
    return ProbeResult(False, error=detail if allow_private else PUBLIC_UNREACHABLE)


async def _close(channel: grpc.aio.Channel) -> None:
    try:
        await asyncio.wait_for(channel.close(grace=None), 1.0)
    except Exception:  # closing a channel that never connected must not fail the probe
        logger.debug("closing a probe channel failed", exc_info=True)


def _first_line(text: str | None, limit: int = 160) -> str:
    return (text or "").strip().splitlines()[0][:limit] if (text or "").strip() else ""


async def probe_all(
    records: Iterable[PeerRecord], *, timeout_s: float, concurrency: int, allow_private: bool = False
) -> dict[tuple[str, str], ProbeResult]:
    """(model, peer id) -> probe result for every record; ``concurrency`` workers share one queue."""
    pending = list(records)
    results: dict[tuple[str, str], ProbeResult] = {}
    if not pending:
        return results
    queue = iter(pending)

    async def worker() -> None:
        for record in queue:  # one shared iterator: each record is taken by exactly one worker
            result = await probe_peer(record, timeout_s, allow_private=allow_private)
            results[record.model_name, record.peer_id] = result

    async with asyncio.TaskGroup() as group:
        for index in range(min(max(1, concurrency), len(pending))):
            group.create_task(worker(), name=f"probe worker {index}")
    return results
