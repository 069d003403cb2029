"""The client's view of the swarm: its DHT node, the model's records, routes, and gRPC channels."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import grpc

from brigade.client.config import ClientConfig
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import peer_channel
from brigade.protocol.errors import MissingLayersError
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord
from brigade.routing.dht import start_dht
from brigade.routing.route import Hop, find_route
from brigade.routing.swarm import fetch_records

logger = logging.getLogger(__name__)

class RemoteSwarm:
    """Lives on the client's event loop; ``start`` joins the DHT, ``close`` leaves it."""

    def __init__(self, config: ClientConfig, model_name: str, num_layers: int):
        self.config = config
        self.model_name = model_name
        self.num_layers = num_layers
        self._dht: Any = None
        self._records: list[PeerRecord] = []
        self._records_at = float("-inf")
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self.identity = Identity.load_or_create(config.identity_path) if config.identity_path else Identity.generate()

    async def start(self) -> None:
        self._dht = await asyncio.to_thread(
            start_dht,
            self.config.initial_peers,
            client_mode=True,
            startup_timeout_s=self.config.dht_startup_timeout_s,
        )

    async def records(self, max_age_s: float | None = None) -> list[PeerRecord]:
        max_age_s = self.config.records_max_age_s if max_age_s is None else max_age_s
        if time.monotonic() - self._records_at > max_age_s:
            fetched = await fetch_records(self._dht, self.model_name)
            self._records = [record for record in fetched if self._usable(record)]
            self._records_at = time.monotonic()
        return self._records

    async def route(
        self, start: int, end: int, exclude: Collection[str] | Callable[[], Collection[str]] = (), *,
        fresh: bool = False, wait_s: float | None = None, cache_tokens: int = 0,
    ) -> list[Hop]:
        """A chain of peers for layers [start, end), waiting up to ``wait_s`` for coverage.

        ``fresh`` reads the DHT now instead of reusing a recent view (after a failure, say). Peers
        that announced less free cache than ``cache_tokens`` are avoided when others can serve.
        ``exclude`` may be a callable, asked again on every try: a ban that expires while this
        waits makes its peer usable again at once.
        """
        deadline = time.monotonic() + (self.config.route_wait_s if wait_s is None else wait_s)
        max_age_s: float | None = 0.0 if fresh else None
        excluded = exclude if callable(exclude) else (lambda: exclude)
        while True:
            exclude = set(excluded())
            records = await self.records(max_age_s)
            full = {record.peer_id for record in records if record.free_cache_tokens < cache_tokens}
            try:
                if full:
                    try:
                        return find_route(records, start, end, exclude={*exclude, *full})
                    except MissingLayersError:
                        pass  # only full peers serve some layers: try them, they may have room by now
                return find_route(records, start, end, exclude=exclude)
            except MissingLayersError as error:
                if time.monotonic() >= deadline:
                    raise MissingLayersError(self.model_name, error.missing) from None
            max_age_s = 0.0  # coverage was missing: read the DHT afresh each time
            await asyncio.sleep(0.25)

    def _usable(self, record: PeerRecord) -> bool:
        """Records this client may route through: its model shape, quantizations, lists, and security."""
        config = self.config
        if record.num_layers != self.num_layers:
            return False
        if config.quantizations is not None and record.quantization not in config.quantizations:
            return False
        if record.peer_id in config.blocked_peers:
            return False
        if config.allowed_peers is not None and record.peer_id not in config.allowed_peers:
            return False
        return bool(record.tls_cert) or config.allow_insecure

    def stub(self, record: PeerRecord) -> pb_grpc.PeerStub:
        """A stub on a channel pinned to ``record``'s certificate (one channel per address and certificate)."""
        key = (record.address, record.tls_spki_sha256)
        channel = self._channels.get(key)
        if channel is None:
            channel = peer_channel(record, self.config.max_message_bytes, allow_insecure=self.config.allow_insecure)
            self._channels[key] = channel
        return pb_grpc.PeerStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._dht is not None:
            await asyncio.to_thread(self._dht.shutdown)
            self._dht = None
