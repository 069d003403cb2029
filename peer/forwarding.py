"""Peer-to-peer forwarding: a session's outputs go straight to the next hop's session.

The client opens every hop's session itself and tells each peer where its outputs go
(``OpenSession.next``): the next peer's address, its session id and the certificate to pin. The
first output opens one push stream to that peer, attaches it to the session with a token signed by
this peer's identity (the next peer accepts it only from the ``upstream_peer_id`` the client
named), and from then on every output chunk is one ``Step`` message on it. A decode step then
costs one network trip per hop plus one back to the client, instead of two per hop.

When the next hop cannot be reached, ``send`` raises ``ForwardError`` and the servicer returns the
output to the client instead (``forward_error``), which carries on client-driven for that pair.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.tokens import make_token

logger = logging.getLogger(__name__)


class ForwardError(ConnectionError):
    """The next hop could not take a forwarded step."""


class Forwarder:
    """The push stream from one session to the next hop's session; opened lazily, closed with it."""

    def __init__(
        self,
        next_hop: pb.NextHop,
        identity: Identity,
        channel_for: Callable[[pb.NextHop], grpc.aio.Channel],
        timeout_s: float,
    ):
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
            self.broken = f"could not forward to {self.next_hop.peer_id} at {self.next_hop.address}: {error!r}"
            self.close()
            raise ForwardError(self.broken) from error

    async def _open(self) -> None:
        channel = self._channel_for(self.next_hop)
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
