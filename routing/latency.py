"""What a client has measured of each peer, kept small and turned into route costs.

Two figures per peer, each an exponential moving average so they follow a peer that gets busy
or a link that gets worse:

- ``rtt_ms``: the network part of a hop. From ``Info`` pings, and from every step: the step's
  round trip minus the compute time the peer reported for it (what a hop costs beyond compute:
  transfer, serialisation, queues);
- ``compute_scale``: measured compute over announced compute. The measured part is the step's
  round trip minus our own ``rtt_ms`` for the peer, so a peer that over-announces its throughput
  or under-reports its compute time still ends up costed at what the client really waited.

Pure bookkeeping, no I/O: the client's swarm view feeds it and asks it for ``RouteCosts``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from brigade.protocol.records import PeerRecord
from brigade.routing.route import RouteCosts

MAX_PEERS = 4096  # peers remembered; the least recently measured are forgotten first
SMOOTHING = 0.3  # weight of a new measurement
MIN_SCALE, MAX_SCALE = 0.2, 20.0  # one odd step must not make a peer look free or hopeless


class LatencyBook:
    def __init__(self, max_peers: int = MAX_PEERS, smoothing: float = SMOOTHING):
        self.max_peers = max_peers
        self.smoothing = smoothing
        self._rtt: OrderedDict[str, float] = OrderedDict()
        self._scale: OrderedDict[str, float] = OrderedDict()

    def _update(self, table: OrderedDict[str, float], peer_id: str, value: float) -> None:
        held = table.pop(peer_id, None)
        table[peer_id] = value if held is None else self.smoothing * value + (1 - self.smoothing) * held
        while len(table) > self.max_peers:
            table.popitem(last=False)

    def observe_rtt(self, peer_id: str, ms: float) -> None:
        if ms >= 0:
            self._update(self._rtt, peer_id, ms)

    def observe_step(self, peer: PeerRecord, layers: int, elapsed_ms: float, compute_ms: float) -> None:
        """One decode-sized step on ``layers`` layers of ``peer``: its round trip and the peer's compute time."""
        if elapsed_ms <= 0 or layers <= 0:
            return
        if 0 <= compute_ms <= elapsed_ms:
            self.observe_rtt(peer.peer_id, elapsed_ms - compute_ms)
        rtt = self._rtt.get(peer.peer_id)
        if peer.throughput > 0 and rtt is not None:
            predicted = layers * 1000.0 / peer.throughput
            measured = max(elapsed_ms - rtt, 0.0)
            self._update(self._scale, peer.peer_id, min(max(measured / predicted, MIN_SCALE), MAX_SCALE))

    def rtt_ms(self, peer_id: str) -> float | None:
        return self._rtt.get(peer_id)

    def compute_scale(self, peer_id: str) -> float:
        return self._scale.get(peer_id, 1.0)

    def knows(self, peer_id: str) -> bool:
        return peer_id in self._rtt

    def costs(self, base: RouteCosts | None = None) -> RouteCosts:
        """``base`` (the session's profile) with this book's measurements filled in."""
        return replace(base or RouteCosts(), rtt_ms=dict(self._rtt), compute_scale=dict(self._scale))
