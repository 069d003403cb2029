"""The client's view of the swarm: its DHT node, the model's records, routes, and gRPC channels."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import grpc

from brigade.client.config import ClientConfig
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_cache import ChannelCache, DialKey
from brigade.protocol.channels import handshake_failure, peer_channel
from brigade.protocol.errors import MissingLayersError
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord
from brigade.routing.dht import start_dht
from brigade.routing.latency import LatencyBook
from brigade.routing.route import Hop, RouteCosts, find_route
from brigade.routing.swarm import fetch_records

logger = logging.getLogger(__name__)

MAX_CHANNELS = 256  # peers this client keeps a channel open to (least recently used idle one closed first)

class RemoteSwarm:
    """Lives on the client's event loop; ``start`` joins the DHT, ``close`` leaves it."""

    def __init__(self, config: ClientConfig, model_name: str, num_layers: int, *, hidden_size: int,
                 rope_by_length: bool = False):
        self.config = config
        self.model_name = model_name
        self.num_layers = num_layers
        self.hidden_size = hidden_size  # the model's width: every hop's answer must have it
        # The model's rotary table depends on the sequence length (dynamic NTK, LongRoPE): steps say
        # which forward call each position belongs to (kernels/rope.py).
        self.rope_by_length = rope_by_length
        self._dht: Any = None
        self._records: list[PeerRecord] = []
        self._records_at = float("-inf")
        self._not_invariant = 0  # peers of the last read left out only for not being batch-invariant
        self._channels = ChannelCache(MAX_CHANNELS)  # keyed by the whole dial: a copied address+pin poisons nothing
        self.identity = Identity.load_or_create(config.identity_path) if config.identity_path else Identity.generate()
        self.latency = LatencyBook()  # what this client measured of each peer (round trips, compute speed)

    async def start(self) -> None:
        self._dht = await asyncio.to_thread(
            start_dht,
            self.config.initial_peers,
            client_mode=True,
            startup_timeout_s=self.config.dht_startup_timeout_s,
        )  # no peer filter in the node: hivemind would drop a model's whole entry for one refused record

    async def records(self, max_age_s: float | None = None) -> list[PeerRecord]:
        max_age_s = self.config.records_max_age_s if max_age_s is None else max_age_s
        if time.monotonic() - self._records_at > max_age_s:
            fetched = await fetch_records(self._dht, self.model_name, peer_filter=self.config.peer_filter)
            self._records = [record for record in fetched if self._usable(record)]
            # Peers left out only for not being batch-invariant: named in a coverage error, or it would mislead.
            self._not_invariant = sum(1 for record in fetched if self.config.batch_invariant
                                      and not record.batch_invariant and self._usable(record, invariance=False))
            self._records_at = time.monotonic()
        return self._records

    async def route(
        self, start: int, end: int, exclude: Collection[str] | Callable[[], Collection[str]] = (), *,
        fresh: bool = False, wait_s: float | None = None, cache_tokens: int = 0, batch_size: int = 1,
        prefill_tokens: int = 0, decode_tokens: int = 1, ping_unknown: bool = True, forwarding: bool = False,
    ) -> list[Hop]:
        """The fastest chain of peers for layers [start, end), waiting up to ``wait_s`` for coverage.

        ``fresh`` reads the DHT now instead of reusing a recent view (after a failure, say). Peers
        that announced less free cache than ``cache_tokens`` are used only when nothing else serves
        their layers. ``batch_size``, ``prefill_tokens`` (positions to replay or prefill, all
        sequences) and ``decode_tokens`` (steps expected) describe the work: latency-bound work
        takes the fastest chain, throughput-bound work spreads over near-equal ones. Peers not
        measured yet that could be on the route are pinged first (``route_pings`` at most) unless
        ``ping_unknown`` is False (a failover should not wait on pings). ``forwarding``: hops pass
        activations to each other, so a hop's network cost is the previous peer's announced ping.
        ``exclude`` may be a callable, asked again on every try: a ban that expires while this
        waits makes its peer usable again at once.
        """
        deadline = time.monotonic() + (self.config.route_wait_s if wait_s is None else wait_s)
        max_age_s: float | None = 0.0 if fresh else None
        excluded = exclude if callable(exclude) else (lambda: exclude)
        bulk = batch_size >= self.config.bulk_batch_size or prefill_tokens >= self.config.bulk_prefill_tokens
        profile = RouteCosts(
            batch_size=batch_size, prefill_tokens=prefill_tokens, decode_tokens=max(1, decode_tokens),
            cache_tokens=cache_tokens, slack=self.config.bulk_route_slack if bulk else self.config.route_slack,
            forwarding=forwarding,
        )
        while True:
            exclude = set(excluded())
            records = await self.records(max_age_s)
            try:
                route = find_route(records, start, end, exclude=exclude, costs=self.latency.costs(profile))
                if ping_unknown and await self.measure(records, route, start, end, exclude):
                    route = find_route(records, start, end, exclude=exclude, costs=self.latency.costs(profile))
                return route
            except MissingLayersError as error:
                if time.monotonic() >= deadline:
                    hint = (f" in batch-invariant mode ({self._not_invariant} peers serve this model without "
                            "--batch-invariant; batch_invariant=True uses only peers started with it)"
                            if self._not_invariant else "")
                    raise MissingLayersError(self.model_name, error.missing, hint) from None
            max_age_s = 0.0  # coverage was missing: read the DHT afresh each time
            await asyncio.sleep(0.25)

    def _usable(self, record: PeerRecord, invariance: bool = True) -> bool:
        """Records this client may route through: its model shape, quantizations, batch invariance, security.

        The allowlist and blocklist were applied when the records were read (``fetch_records``)."""
        config = self.config
        if record.num_layers != self.num_layers:
            return False
        if config.quantizations is not None and record.quantization not in config.quantizations:
            return False
        if invariance and config.batch_invariant and not record.batch_invariant:
            return False  # its results depend on other sessions' load: a replay there would not be exact
        if record.reachable is False and not record.relay_peer_id:
            return False  # cannot accept connections and has no relay (yet): nobody can reach it
        return bool(record.tls_cert) or config.allow_insecure

    async def measure(
        self, records: list[PeerRecord], route: list[Hop], start: int, end: int, exclude: Collection[str]
    ) -> bool:
        """Pings peers this client has not measured: those on ``route`` first, then others holding
        its layers, at most ``route_pings``, concurrently, each bounded by ``ping_timeout_s``.
        True when it learned something (the route is worth finding again)."""
        limit = self.config.route_pings
        if limit <= 0:
            return False
        excluded = set(exclude)
        wanted: dict[str, PeerRecord] = {}
        candidates = [hop.peer for hop in route] + [
            record for record in records
            if record.state == "online" and record.start_layer < end and record.end_layer > start
        ]
        for record in candidates:
            if len(wanted) >= limit:
                break
            if record.peer_id not in excluded and not self.latency.knows(record.peer_id):
                wanted.setdefault(record.peer_id, record)
        if not wanted:
            return False
        results = await asyncio.gather(*(self.ping(record) for record in wanted.values()))
        return any(result is not None for result in results)

    async def ping(self, record: PeerRecord) -> float | None:
        """One round trip to ``record``'s peer (``Info`` on a connected channel, ms), noted in ``latency``."""
        stub = self.stub(record)
        timeout = self.config.ping_timeout_s
        try:
            await stub.Info(pb.InfoRequest(), timeout=timeout)  # connects: not counted
            began = time.perf_counter()
            await stub.Info(pb.InfoRequest(), timeout=timeout)
        except (grpc.RpcError, OSError, TimeoutError) as error:
            details = error.details() if isinstance(error, grpc.aio.AioRpcError) else ""
            handshake = handshake_failure(record.address, details or "")
            if handshake is not None:
                logger.warning("peer %s: %s", record.peer_id, handshake)
            logger.debug("ping of %s at %s failed: %r", record.peer_id, record.address, error)
            return None
        ms = (time.perf_counter() - began) * 1000
        self.latency.observe_rtt(record.peer_id, ms)
        return ms

    def stub(self, record: PeerRecord) -> pb_grpc.PeerStub:
        """A stub on a channel pinned to ``record``'s certificate: one channel per peer id, address,
        certificate and relay, so another record copying this one's address and pin cannot share it."""
        key = DialKey(record.peer_id, record.address, record.tls_cert, record.tls_spki_sha256, record.relay_peer_id)
        channel = self._channels.get(key, lambda: peer_channel(
            record, self.config.max_message_bytes, allow_insecure=self.config.allow_insecure))
        return pb_grpc.PeerStub(channel)

    async def close(self) -> None:
        await self._channels.close()
        if self._dht is not None:
            await asyncio.to_thread(self._dht.shutdown)
            self._dht = None
