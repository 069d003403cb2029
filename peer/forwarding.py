"""Peer-to-peer forwarding: a session's outputs go straight to the next hop's session.

The client opens every hop's session itself and tells each peer where its outputs go
(``OpenSession.next``, or later ``Relink``): the next peer's id and its session id. Where that
peer is reached (address, certificate, relay) comes from the next peer's own signed record, which
this peer reads from the DHT itself (``ForwardChannels``): what the client writes in those fields
is ignored, so no client can make a peer dial an address of its choosing (an SSRF). Outside a
private swarm the record's address must also be public (``protocol/targets.py``). The
first output opens one push stream to that peer, attaches it to the session with a token signed by
this peer's identity (the next peer accepts it only from the ``upstream_peer_id`` the client
named), and from then on every output chunk is one ``Step`` message on it. A decode step then
costs one network trip per hop plus one back to the client, instead of two per hop.

When the next hop cannot be reached, ``send`` raises ``ForwardError`` and the servicer returns the
output to the client instead (``forward_error``), which carries on client-driven for that pair.
The error says only a coarse reason ("no signed record", "not a public address", "unreachable",
"timed out"); the details (addresses, OpenSSL's words) go to this peer's log, never to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_cache import ChannelCache, DialKey
from brigade.protocol.channels import InsecurePeerError, peer_channel
from brigade.protocol.identity import Identity
from brigade.protocol.messages import NextHop
from brigade.protocol.records import PeerRecord, newest_per_peer
from brigade.protocol.targets import ForbiddenTargetError, dial_target
from brigade.protocol.tls import TlsPinError
from brigade.protocol.tokens import make_token

logger = logging.getLogger(__name__)


RECORDS_MAX_AGE_S = 5.0  # a read of the swarm's records serves next-hop look-ups this long
RECORDS_RETRY_S = 1.0  # an unknown (or moved) next hop triggers a fresh read when the last is older than this
MAX_FORWARD_CHANNELS = 64  # next-hop channels kept open (least recently used idle one closed first)


class ForwardError(ConnectionError):
    """The next hop could not take a forwarded step (the message is a coarse reason, safe to return)."""


class ForwardChannels:
    """Channels to next hops, dialed from each next peer's own signed record; bounded, keyed by the whole dial."""

    def __init__(self, read_records: Callable[[], Awaitable[list[PeerRecord]]], *, allow_private: bool,
                 allow_insecure: bool, max_message_bytes: int, max_channels: int = MAX_FORWARD_CHANNELS):
        """``read_records()`` reads this model's records from the DHT (peer filter applied). No I/O here."""
        self._read_records = read_records
        self.allow_private = allow_private
        self.allow_insecure = allow_insecure
        self.max_message_bytes = max_message_bytes
        self._cache = ChannelCache(max_channels)
        self._records: dict[str, PeerRecord] = {}
        self._read_at = float("-inf")
        self._reading = asyncio.Lock()

    async def record_of(self, peer_id: str, hint: str = "") -> PeerRecord | None:
        """``peer_id``'s newest signed record, read again (at most every ``RECORDS_RETRY_S``) when it
        is unknown or its address is not the client's ``hint``: a restarted peer's new address is
        picked up at once. The hint only triggers a read; it is never dialed."""
        age = time.monotonic() - self._read_at
        known = self._records.get(peer_id)
        stale = known is None or bool(hint and known.address != hint)
        if age > RECORDS_MAX_AGE_S or (stale and age > RECORDS_RETRY_S):
            async with self._reading:
                if time.monotonic() - self._read_at > RECORDS_RETRY_S:
                    self._records = newest_per_peer(await self._read_records())
                    self._read_at = time.monotonic()
        return self._records.get(peer_id)

    async def channel_for(self, peer_id: str, hint: str = "") -> grpc.aio.Channel:
        """The channel to ``peer_id`` as its record describes it; ForwardError (coarse) when it cannot be had.

        ``hint`` is the address the client named (see ``record_of``)."""
        try:
            record = await self.record_of(peer_id, hint)
        except Exception as error:  # a DHT hiccup is this peer's problem, not the client's request
            logger.warning("reading records for next hop %s failed: %r", peer_id[:64], error)
            raise ForwardError("the next hop's record could not be read") from error
        if record is None:
            raise ForwardError("the next hop has no signed record in this swarm")
        try:
            address = await dial_target(record.address, allow_private=self.allow_private)
        except ForbiddenTargetError as error:
            logger.info("not forwarding to %s at %s: %s", peer_id[:64], record.address[:100], error)
            raise ForwardError(f"the next hop's address is refused: {error}") from error
        dialed = record.model_copy(update={"address": address}) if address != record.address else record
        key = DialKey(record.peer_id, address, record.tls_cert, record.tls_spki_sha256, record.relay_peer_id)
        try:
            return self._cache.get(key, lambda: peer_channel(dialed, self.max_message_bytes,
                                                             allow_insecure=self.allow_insecure))
        except (InsecurePeerError, TlsPinError, ValueError) as error:
            logger.info("not forwarding to %s: %r", peer_id[:64], error)
            raise ForwardError("the next hop's record cannot be dialed from here") from error

    def __len__(self) -> int:
        return len(self._cache)

    async def close(self) -> None:
        await self._cache.close()


def _coarse(error: BaseException) -> str:
    """What a caller may learn of a failed forward: a reason, never an address or a library's words."""
    if isinstance(error, ForwardError):
        return str(error)
    if isinstance(error, TimeoutError):
        return "the next hop did not take the step in time"
    if isinstance(error, grpc.aio.AioRpcError):
        return f"the next hop is unreachable ({error.code().name})"
    return "the next hop is unreachable"


class Forwarder:
    """The push stream from one session to the next hop's session; opened lazily, closed with it."""

    def __init__(
        self,
        next_hop: NextHop,
        identity: Identity,
        channel_for: Callable[[str, str], Awaitable[grpc.aio.Channel]],
        timeout_s: float,
    ):
        """``channel_for(peer_id, hint)`` is ``ForwardChannels.channel_for``: only the next hop's id and
        session id are taken from ``next_hop`` (its address at most prompts a fresh read of the
        records); where to dial comes from that peer's record."""
        self.next_hop = next_hop
        self._identity = identity
        self._channel_for = channel_for
        self._timeout_s = timeout_s
        self._call: grpc.aio.StreamStreamCall | None = None
        self._watch: asyncio.Task[None] | None = None
        self.broken: str = ""  # why the stream failed, once it has

    async def send(self, step: pb.Step) -> None:
        if self.broken:
            raise ForwardError(self.broken)
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._call is None:
                    await self._open()
                assert self._call is not None
                await self._call.write(pb.InferenceRequest(session_id=self.next_hop.session_id, step=step))
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError, ConnectionError, OSError,
                ValueError) as error:
            logger.info("could not forward to %s: %r", self.next_hop.peer_id[:64], error)
            self.broken = f"could not forward to {self.next_hop.peer_id[:64]}: {_coarse(error)}"
            self.close()
            raise ForwardError(self.broken) from error

    async def _open(self) -> None:
        channel = await self._channel_for(self.next_hop.peer_id, self.next_hop.address)
        call = pb_grpc.PeerStub(channel).Inference()
        token = make_token(self._identity, self.next_hop.peer_id, "attach", self.next_hop.session_id.encode())
        await call.write(pb.InferenceRequest(attach=pb.Attach(session_id=self.next_hop.session_id, token=token)))
        self._call = call
        self._watch = asyncio.create_task(self._watch_for_errors(call), name="forward-watch")

    async def _watch_for_errors(self, call: grpc.aio.StreamStreamCall) -> None:
        """The next peer answers a push stream only by ending it; remember why, so sends fail fast."""
        try:
            async for _ in call:
                pass
            code = await call.code()
            if code != grpc.StatusCode.OK and not self.broken:
                self.broken = f"next hop {self.next_hop.peer_id} ended the push stream: {code.name}"
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            if not self.broken and not isinstance(error, asyncio.CancelledError):
                self.broken = f"next hop {self.next_hop.peer_id} ended the push stream: {error.code().name}"

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._watch is not None:
            self._watch.cancel()
