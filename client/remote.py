"""The client's view of the swarm: its DHT node, the model's records, routes, and gRPC channels."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Any

import grpc

from brigade.client.config import ClientConfig
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_options import grpc_options
from brigade.protocol.errors import MissingLayersError
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
        self._channels: dict[str, grpc.aio.Channel] = {}

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
            allowed = self.config.quantizations
            self._records = [
                record for record in fetched
                if record.num_layers == self.num_layers and (allowed is None or record.quantization in allowed)
            ]
            self._records_at = time.monotonic()
        return self._records

    async def route(
        self, start: int, end: int, exclude: Collection[str] = (), *, fresh: bool = False, wait_s: float | None = None,
        cache_tokens: int = 0,
    ) -> list[Hop]:
        """A chain of peers for layers [start, end), waiting up to ``wait_s`` for coverage.

        ``fresh`` reads the DHT now instead of reusing a recent view (after a failure, say). Peers
        that announced less free cache than ``cache_tokens`` are avoided when others can serve.
        """
        deadline = time.monotonic() + (self.config.route_wait_s if wait_s is None else wait_s)
        max_age_s: float | None = 0.0 if fresh else None
        while True:
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

    def stub(self, address: str) -> pb_grpc.PeerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address,
                options=grpc_options(self.config.max_message_bytes),
            )
            self._channels[address] = channel
        return pb_grpc.PeerStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._dht is not None:
            await asyncio.to_thread(self._dht.shutdown)
            self._dht = None
