"""A bounded cache of gRPC channels, keyed by every parameter of the dial.

Channels are reused (one TCP+TLS connection per peer, not per session), but a cache keyed by less
than what the dial used can be poisoned: a record that copies an honest peer's address and pin
and adds a relay would get its relayed channel handed to the honest peer, whose calls then fail,
and the honest peer is blamed. So the key is the whole dial: peer id, address, certificate, pin,
relay. And since anyone can publish records, the cache is an LRU with a size limit; an evicted
channel is closed in an owned task with a grace period, so calls already on it can finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHANNELS = 64  # channels kept open at once
EVICT_GRACE_S = 30.0  # calls on an evicted channel get this long before it is closed under them


@dataclass(frozen=True)
class DialKey:
    """Everything that decides where a channel goes and whom it trusts."""

    peer_id: str
    address: str
    tls_cert: str
    spki_pin: str
    relay_peer_id: str  # "" = direct


class ChannelCache:
    """``get(key, dial)``: the cached channel for ``key`` or a new one from ``dial()``; LRU-bounded."""

    def __init__(self, max_channels: int = DEFAULT_MAX_CHANNELS, *, evict_grace_s: float = EVICT_GRACE_S):
        if max_channels < 1:
            raise ValueError(f"max_channels must be at least 1, got {max_channels}")
        self.max_channels = max_channels
        self.evict_grace_s = evict_grace_s
        self._channels: OrderedDict[DialKey, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, key: DialKey, dial: Callable[[], grpc.aio.Channel]) -> grpc.aio.Channel:
        channel = self._channels.get(key)
        if channel is not None:
            self._channels.move_to_end(key)
            return channel
        channel = dial()
        self._channels[key] = channel
        while len(self._channels) > self.max_channels:
            _, evicted = self._channels.popitem(last=False)
            self._close_later(evicted, self.evict_grace_s)
        return channel

    def _close_later(self, channel: grpc.aio.Channel, grace_s: float) -> None:
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
