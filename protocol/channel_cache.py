"""A bounded cache of gRPC channels, keyed by every parameter of the dial.

Channels are reused (one TCP+TLS connection per peer, not per session), but a cache keyed by less
than what the dial used can be poisoned: a record that copies an honest peer's address and pin
and adds a relay would get its relayed channel handed to the honest peer, whose calls then fail,
and the honest peer is blamed. So the key is the whole dial: peer id, address, certificate, pin,
relay. And since anyone can publish records, the cache is an LRU with a size limit.

Eviction never closes a channel with calls on it: a live session's stream is opened once and its
channel is not asked for again, so by recency alone it would be the first to go, and a flood of
records (which the client pings) or of next-hop ids would cancel honest streams and get honest
peers banned. So every channel counts the calls it carries (``TrackedChannel``), eviction takes
the least recently used channel with none, and busy channels may keep the cache over its limit
until their calls end (they are bounded by what this process itself opened). An evicted idle
channel is closed in an owned task with a short grace, for a call started between the two.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHANNELS = 64  # channels kept open at once
EVICT_GRACE_S = 30.0  # a call started on a channel just evicted (idle) gets this long before it is closed


@dataclass(frozen=True)
class DialKey:
    """Everything that decides where a channel goes and whom it trusts."""

    peer_id: str
    address: str
    tls_cert: str
    spki_pin: str
    relay_peer_id: str  # "" = direct


class _CountedCall:
    """A multicallable that tells its channel when each call it starts begins and ends."""

    def __init__(self, channel: TrackedChannel, inner: Any):
        self._channel = channel
        self._inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self._inner(*args, **kwargs)
        self._channel.calls += 1
        call.add_done_callback(self._channel._call_done)
        return call


class TrackedChannel(grpc.aio.Channel):
    """A grpc.aio channel that counts its calls in flight, so a cache never closes one in use."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel  # the dialed channel
        self.calls = 0  # calls started and not done

    def _call_done(self, _call: object) -> None:
        self.calls -= 1

    @property
    def busy(self) -> bool:
        return self.calls > 0

    async def __aenter__(self) -> TrackedChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.channel.close()

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.channel.channel_ready()

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _CountedCall(self, self.channel.unary_unary(*args, **kwargs))

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _CountedCall(self, self.channel.unary_stream(*args, **kwargs))

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _CountedCall(self, self.channel.stream_unary(*args, **kwargs))

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _CountedCall(self, self.channel.stream_stream(*args, **kwargs))


class ChannelCache:
    """``get(key, dial)``: the cached channel for ``key`` or a new one from ``dial()``; LRU-bounded.

    Only channels without calls in flight are evicted (see the module docstring)."""

    def __init__(self, max_channels: int = DEFAULT_MAX_CHANNELS, *, evict_grace_s: float = EVICT_GRACE_S):
        if max_channels < 1:
            raise ValueError(f"max_channels must be at least 1, got {max_channels}")
        self.max_channels = max_channels
        self.evict_grace_s = evict_grace_s
        self._channels: OrderedDict[DialKey, TrackedChannel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, key: DialKey, dial: Callable[[], grpc.aio.Channel]) -> TrackedChannel:
        channel = self._channels.get(key)
        if channel is not None:
            self._channels.move_to_end(key)
            return channel
        channel = TrackedChannel(dial())
        self._channels[key] = channel
        self._evict(keep=key)
        return channel

    def _evict(self, keep: DialKey) -> None:
        """Closes least recently used idle channels while over the limit; busy ones stay (and count)."""
        excess = len(self._channels) - self.max_channels
        if excess <= 0:
            return
        idle = [key for key, channel in self._channels.items() if key != keep and not channel.busy][:excess]
        for key in idle:
            self._close_later(self._channels.pop(key), self.evict_grace_s)

    def _close_later(self, channel: TrackedChannel, grace_s: float) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=grace_s), name="close-evicted-channel")
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("closing an evicted channel failed", exc_info=task.exception())

    async def close(self) -> None:
        """Closes every channel, cached or evicted (bounded by the evicted ones' grace)."""
        channels, self._channels = list(self._channels.values()), OrderedDict()
        for channel in channels:
            await channel.close()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=self.evict_grace_s + 1.0)
