"""Round trips from this peer to the peers that serve the layers right after its span.

When hops forward activations to each other instead of through the client, a route's network
time is the sum of these links, so each peer measures its own and announces them in its record
(``PeerRecord.pings``: peer id -> round trip in ms, at most ``MAX_PINGS``). A round trip is an
``Info`` call on a channel that is already connected (the first call, which pays the connection
set-up, is not counted), the best of two; every call has a deadline and every round of pings
runs its targets concurrently, so a dead or slow target costs one timeout, not a stalled loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

import grpc

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import peer_channel
from brigade.protocol.records import MAX_PINGS, PeerRecord, newest_per_peer

logger = logging.getLogger(__name__)

MAX_PING_MS = 60_000.0  # anything slower is reported as unreachable (left out)
_SMOOTHING = 0.5  # weight of a new measurement against the previous one


def next_hop_targets(records: list[PeerRecord], self_id: str, end_layer: int, known: set[str],
                     rng: random.Random, limit: int = MAX_PINGS) -> list[PeerRecord]:
    """The online peers holding layer ``end_layer`` (the first after this span), at most ``limit``.

    Peers measured before are kept first, so the announced set stays stable; the rest are drawn
    at random, so over time a crowded next layer is sampled fairly.
    """
    newest = newest_per_peer(records)
    candidates = [record for record in newest.values()
                  if record.peer_id != self_id and record.state == "online"
                  and record.start_layer <= end_layer < record.end_layer]
    kept = [record for record in candidates if record.peer_id in known]
    fresh = [record for record in candidates if record.peer_id not in known]
    rng.shuffle(fresh)
    return (kept + fresh)[:limit]


async def round_trip_ms(record: PeerRecord, timeout_s: float) -> float | None:
    """The best of two ``Info`` round trips to ``record``'s peer on a warm channel; None if it fails."""
    channel = peer_channel(record)
    try:
        stub = pb_grpc.PeerStub(channel)
        await stub.Info(pb.InfoRequest(), timeout=timeout_s)  # connects; not counted
        best = float("inf")
        for _ in range(2):
            began = time.perf_counter()
            await stub.Info(pb.InfoRequest(), timeout=timeout_s)
            best = min(best, (time.perf_counter() - began) * 1000)
        return best if best <= MAX_PING_MS else None
    except (TimeoutError, grpc.RpcError, OSError) as error:
        logger.debug("ping of %s at %s failed: %r", record.peer_id, record.address, error)
        return None
    finally:
        await channel.close()


class NextHopPings:
    """Keeps this peer's announced round trips fresh. ``run`` until cancelled; ``current`` any time."""

    def __init__(
        self,
        self_id: str,
        end_layer: Callable[[], int],
        read_records: Callable[[], Awaitable[list[PeerRecord]]],
        *,
        period_s: float = 30.0,
        timeout_s: float = 2.0,
        measure: Callable[[PeerRecord, float], Awaitable[float | None]] = round_trip_ms,
    ):
        """``end_layer()`` is this peer's current span end (it changes when the peer moves);
        ``read_records()`` reads the model's records (from the DHT). No I/O here."""
        self.self_id = self_id
        self._end_layer = end_layer
        self._read_records = read_records
        self.period_s = period_s
        self.timeout_s = timeout_s
        self._measure = measure
        self._pings: dict[str, float] = {}
        self._rng = random.Random()

    def current(self) -> dict[str, float]:
        """Round trips to announce (a copy, at most MAX_PINGS entries, ms rounded to 0.01)."""
        return {peer_id: round(ms, 2) for peer_id, ms in list(self._pings.items())[:MAX_PINGS]}

    async def ping_once(self) -> dict[str, float]:
        """Measures every target once (concurrently) and replaces the set: gone peers drop out."""
        records = await self._read_records()
        end = self._end_layer()
        targets = next_hop_targets(records, self.self_id, end, set(self._pings), self._rng)
        results = await asyncio.gather(*(self._measure(target, self.timeout_s) for target in targets))
        fresh: dict[str, float] = {}
        for target, ms in zip(targets, results, strict=True):
            if ms is None:
                continue
            previous = self._pings.get(target.peer_id)
            fresh[target.peer_id] = ms if previous is None else _SMOOTHING * ms + (1 - _SMOOTHING) * previous
        self._pings = fresh
        logger.debug("round trips to the peers after layer %d: %s", end, self.current())
        return self.current()

    async def run(self) -> None:
        while True:
            try:
                await self.ping_once()
            except Exception:  # a DHT hiccup must not end the loop; the next period tries again
                logger.warning("measuring round trips failed; retrying next period", exc_info=True)
            await asyncio.sleep(self.period_s * self._rng.uniform(0.8, 1.2))
