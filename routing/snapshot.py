"""The swarm as balancing sees it: which peer serves which layers, at what rate.

Span choice and rebalancing are pure functions of one of these snapshots, so they can be run
(and tested) for hundreds of simulated peers without a DHT. A refresher builds snapshots from
signed records; simulations build them directly.

Throughput model. A record's ``throughput`` is tokens/s per layer: one token through one layer
takes ``1 / throughput`` seconds. A peer hosting ``n`` layers therefore pushes at most
``throughput / n`` tokens/s through its span, and that ``rate`` is what it adds to each of its
layers' total. (Counting the full per-layer figure on every hosted layer, as Petals' block
selection does, would let one big peer look like it carries the whole model at full speed.)
A layer's total throughput is the sum of the rates of the online peers that hold it; the swarm's
weakest point is the layer with the smallest total, 0 where no peer holds it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from brigade.protocol.records import PeerRecord, newest_per_peer

# Assumed per-layer throughput when no peer of the swarm announced one (old peers send 0).
FALLBACK_THROUGHPUT = 100.0
MIN_THROUGHPUT = 1e-6  # a peer that holds a layer always counts as covering it, however slow


@dataclass(frozen=True)
class PeerSpan:
    """One peer's place in the swarm: layers ``[start, end)`` at ``throughput`` tokens/s per layer."""

    peer_id: str
    start: int
    end: int
    throughput: float

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"peer {self.peer_id}: need 0 <= start < end, got {self.start}:{self.end}")

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def rate(self) -> float:
        """Tokens/s through the whole span: what this peer adds to each layer it holds."""
        return max(self.throughput, MIN_THROUGHPUT) / self.length

    def moved_to(self, start: int) -> PeerSpan:
        return PeerSpan(self.peer_id, start, start + self.length, self.throughput)


@dataclass(frozen=True)
class SwarmSnapshot:
    """The online peers of one model; ``peers`` are sorted by id so every reader sums in one order."""

    num_layers: int
    peers: tuple[PeerSpan, ...] = ()

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ValueError("the model has no layers")
        ids = [peer.peer_id for peer in self.peers]
        if len(set(ids)) != len(ids):
            raise ValueError("a snapshot holds each peer once")
        for peer in self.peers:
            if peer.end > self.num_layers:
                raise ValueError(f"peer {peer.peer_id} serves {peer.start}:{peer.end}, past {self.num_layers} layers")
        object.__setattr__(self, "peers", tuple(sorted(self.peers, key=lambda peer: peer.peer_id)))

    @classmethod
    def from_records(cls, records: Iterable[PeerRecord], num_layers: int) -> SwarmSnapshot:
        """Online peers of the newest record each; unmeasured throughput reads as the swarm's median.

        Records of another model size, or spans past ``num_layers``, are left out: they cannot
        serve this model's layers.
        """
        newest = newest_per_peer(records)
        online = [
            record for record in newest.values()
            if record.state == "online" and record.num_layers == num_layers and record.end_layer <= num_layers
            and record.start_layer < record.end_layer
        ]
        measured = [record.throughput for record in online if record.throughput > 0]
        fallback = statistics.median(measured) if measured else FALLBACK_THROUGHPUT
        return cls(num_layers, tuple(
            PeerSpan(record.peer_id, record.start_layer, record.end_layer, record.throughput or fallback)
            for record in online
        ))

    def get(self, peer_id: str) -> PeerSpan | None:
        for peer in self.peers:
            if peer.peer_id == peer_id:
                return peer
        return None

    def with_peer(self, peer: PeerSpan) -> SwarmSnapshot:
        """This swarm with ``peer`` added, or moved if it is already here."""
        return SwarmSnapshot(self.num_layers, (*(p for p in self.peers if p.peer_id != peer.peer_id), peer))

    def without(self, peer_id: str) -> SwarmSnapshot:
        return SwarmSnapshot(self.num_layers, tuple(p for p in self.peers if p.peer_id != peer_id))

    def layer_throughput(self) -> np.ndarray:
        """Total tokens/s of each layer ([num_layers], float64); 0 where no peer holds it."""
        totals = np.zeros(self.num_layers)
        for peer in self.peers:  # added slice by slice (no running sum): an empty layer stays exactly 0
            totals[peer.start : peer.end] += peer.rate
        return totals

    def layer_coverage(self) -> np.ndarray:
        """Online peers per layer ([num_layers], int)."""
        counts = np.zeros(self.num_layers + 1, dtype=np.int64)
        for peer in self.peers:
            counts[peer.start] += 1
            counts[peer.end] -= 1
        return np.cumsum(counts)[:-1]

    def total_throughput(self) -> float:
        """Sum over layers of their totals (= sum of the peers' per-layer throughputs)."""
        return float(sum(peer.rate * peer.length for peer in self.peers))
