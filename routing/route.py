"""Route finding for clients: which peers compute which layers, over a snapshot of the swarm.

Pure functions of the records and measurements they are given, with no I/O and no DHT: a
refresher owns the reading and hands snapshots in. That keeps them testable with thousands of
simulated peers and lets a client re-route a failed hop without waiting on the network.

A route minimises the expected time per generated token. It is a shortest path over layer
boundaries: a hop on peer ``r`` from boundary ``x`` to ``e`` (anywhere inside its span, so a slow
peer's tail can be left to a faster one) costs

- compute: ``(e - x)`` layers at the peer's announced throughput (decode, and the prompt's
  prefill amortised over the expected new tokens), scaled by what the client measured of it;
- network: the client's own round trip to the peer (the client relays every hop), or, when
  hops forward to each other, half the previous peer's announced round trip to it;
- a penalty when the peer announced less free cache than the session needs (it would queue or
  refuse), so a full fast peer is used only when nothing else serves those layers.
- a relayed peer (behind a home router, reached through a relay: docs/relays.md) not measured
  yet costs ``relay_hop_ms`` more than the default round trip: its traffic crosses the relay too.
  Once measured, the round trip already includes the relay. Among next hops within ``slack`` of
  the best, direct peers are preferred: a relayed one is drawn only when no direct one is as good.

The search runs backwards over the ``L`` boundaries with numpy over all peers at once: each
peer keeps the best exit found so far (a running minimum, since exits only move forward), so a
route over 1,000 peers takes a few milliseconds. Among next hops whose total is within
``slack`` of the best, one is drawn at random, so clients spread their sessions over equally
good peers instead of all piling onto the first one.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from brigade.protocol.errors import MissingLayersError
from brigade.protocol.records import PeerRecord, newest_per_peer

DEFAULT_RTT_MS = 20.0  # a peer the client has not measured yet (typical for one region)
CACHE_PENALTY_MS = 10_000.0  # a peer short of cache would make the session wait cache_wait_s, or fail
FALLBACK_THROUGHPUT = 100.0  # tokens/s per layer when no peer of the swarm announced any
_MIN_MS = 0.01  # every hop costs something, so a route never re-enters the peer it just left
_TIE = 1e-9


@dataclass(frozen=True)
class Hop:
    """One peer of a route, and the layers ``[start, end)`` it computes (inside its span)."""

    peer: PeerRecord
    start: int
    end: int

    def __post_init__(self) -> None:
        if not (self.start < self.end and self.peer.spans(self.start, self.end)):
            raise ValueError(
                f"hop {self.start}:{self.end} is empty or outside {self.peer.peer_id}'s span "
                f"{self.peer.start_layer}:{self.peer.end_layer}"
            )


@dataclass(frozen=True)
class RouteCosts:
    """What the client knows about what hops cost; the defaults know nothing (fewest hops wins)."""

    rtt_ms: Mapping[str, float] = field(default_factory=dict)  # client's measured round trip per peer id
    compute_scale: Mapping[str, float] = field(default_factory=dict)  # measured / announced compute time per peer
    default_rtt_ms: float = DEFAULT_RTT_MS  # round trip assumed for a peer not measured yet
    batch_size: int = 1  # sequences per decode step
    prefill_tokens: int = 0  # positions every hop computes once (prompt or replay, all sequences)
    decode_tokens: int = 1  # new tokens expected, over which the prefill is amortised
    cache_tokens: int = 0  # positions each hop must hold for the session
    cache_penalty_ms: float = CACHE_PENALTY_MS  # added to a peer that announced less free cache
    forwarding: bool = False  # hops send activations to the next peer (announced pings), not back to the client
    slack: float = 0.0  # pick at random among next hops within this fraction of the best total
    relay_hop_ms: float = DEFAULT_RTT_MS  # added round trip of a relayed peer not measured yet (the relay's leg)


def _check_range(start: int, end: int) -> None:
    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start <= end, got layers {start}:{end}")


def _usable(records: Iterable[PeerRecord], exclude: Collection[str]) -> list[PeerRecord]:
    """Online, non-excluded records, the newest one per peer (an older snapshot may be merged in)."""
    newest = newest_per_peer(records)
    excluded = set(exclude)
    return [
        record
        for record in newest.values()
        if record.state == "online"
        and record.peer_id not in excluded
        and record.start_layer < record.end_layer
    ]


def _missing(usable: list[PeerRecord], start: int, end: int) -> list[tuple[int, int]]:
    spans = sorted((max(r.start_layer, start), min(r.end_layer, end)) for r in usable)
    missing = []
    covered_to = start  # every layer in [start, covered_to) is served
    for span_start, span_end in spans:
        if span_start >= span_end:
            continue  # outside [start, end)
        if span_start > covered_to:
            missing.append((covered_to, span_start))
        covered_to = max(covered_to, span_end)
    if covered_to < end:
        missing.append((covered_to, end))
    return missing


def missing_spans(
    records: Iterable[PeerRecord], start: int, end: int, *, exclude: Collection[str] = ()
) -> list[tuple[int, int]]:
    """The merged half-open spans of ``[start, end)`` that no online, non-excluded peer serves."""
    _check_range(start, end)
    return _missing(_usable(records, exclude), start, end)


def _median_positive(values: Iterable[float]) -> float | None:
    positive = [value for value in values if value > 0]
    return statistics.median(positive) if positive else None


def layer_ms(peers: list[PeerRecord], costs: RouteCosts) -> np.ndarray:
    """Expected compute milliseconds per layer per generated token, for each peer ([P]).

    Unmeasured peers (throughput 0) count as the swarm's median one; a peer's prefill
    throughput, when not announced, as its decode throughput times the swarm's median ratio.
    """
    decode_default = _median_positive(p.throughput for p in peers) or FALLBACK_THROUGHPUT
    ratio = _median_positive(p.prefill_throughput / p.throughput for p in peers
                             if p.throughput > 0 and p.prefill_throughput > 0) or 1.0
    decode = np.array([p.throughput or decode_default for p in peers])
    prefill = np.array([p.prefill_throughput or (p.throughput or decode_default) * ratio for p in peers])
    scale = np.array([costs.compute_scale.get(p.peer_id, 1.0) for p in peers])
    step_s = np.maximum(1.0 / decode, costs.batch_size / prefill)  # one decode step of the whole batch
    prefill_s = costs.prefill_tokens / prefill / max(1, costs.decode_tokens)
    return 1000.0 * scale * (step_s + prefill_s)


@dataclass
class _Search:
    """Arrays over the usable peers, and the backward pass's results per boundary."""

    peers: list[PeerRecord]
    starts: np.ndarray  # [P] first layer
    ends: np.ndarray  # [P] end layer, clipped to the route's end
    tau: np.ndarray  # [P] ms per layer per token
    penalty: np.ndarray  # [P] ms added to any hop on the peer (short of cache)
    relayed: np.ndarray  # [P] bool: reached through a relay (a direct peer wins ties)
    enter: np.ndarray  # [P] ms to reach the peer from the client (first hop; every hop when relaying)
    link: np.ndarray  # [P] ms to reach the peer from a peer that announced no ping to it
    back: np.ndarray  # [P] ms from the peer back to the client after the last hop
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (source, target, one-way ms) of announced pings
    forwarding: bool
    after: dict[int, np.ndarray] = field(default_factory=dict)  # boundary -> [P] cost of starting a hop there
    exits: dict[int, np.ndarray] = field(default_factory=dict)  # boundary -> [P] best exit of that hop

    def next_costs(self, boundary: int, end: int) -> np.ndarray:
        """[P] cost, for each peer, of everything after it finishes at ``boundary``."""
        if boundary == end:
            return self.back
        generic = self.link + self.after[boundary]  # inf for peers not holding layer `boundary`
        if not self.forwarding:
            return np.full(len(self.peers), generic.min())  # the client relays: the same for every peer
        result = self._best_unannounced(generic)
        if self.edges is not None:
            source, target, ms = self.edges
            np.minimum.at(result, source, ms + self.penalty[target] + self.after[boundary][target])
        return result

    def _best_unannounced(self, generic: np.ndarray) -> np.ndarray:
        """Per source peer, the best next hop among peers it announced no ping to (those go at the
        unannounced price; announced ones are counted at their own ping by the caller)."""
        count = len(self.peers)
        if self.edges is None:
            return np.full(count, generic.min())
        source, target, _ = self.edges
        keep = min(count, 1 + int(np.bincount(source).max()))
        top = np.argpartition(generic, keep - 1)[:keep] if keep < count else np.arange(count)
        top = top[np.argsort(generic[top], kind="stable")]
        rank = np.full(count, -1)
        rank[top] = np.arange(len(top))
        hit = rank[target] >= 0
        blocked = np.zeros((count, len(top)), dtype=bool)
        blocked[source[hit], rank[target[hit]]] = True
        first_free = np.argmin(blocked, axis=1)  # the first of the best that this source did not announce
        return np.where(blocked.all(axis=1), np.inf, generic[top[first_free]])

    def arrival(self, previous: int | None) -> np.ndarray:
        """[P] cost of reaching each peer from the client, or from ``previous`` when forwarding."""
        if previous is None or not self.forwarding:
            return self.enter
        arrival = self.link.copy()
        if self.edges is not None:
            source, target, ms = self.edges
            mine = source == previous
            arrival[target[mine]] = ms[mine] + self.penalty[target[mine]]
        return arrival


def _prepare(usable: list[PeerRecord], end: int, costs: RouteCosts) -> _Search:
    relayed = np.array([bool(p.relay_peer_id) for p in usable], dtype=bool)
    rtt = np.maximum(np.array([costs.rtt_ms.get(p.peer_id, _default_rtt(p, costs)) for p in usable], dtype=float),
                     _MIN_MS)
    free = np.array([p.free_cache_tokens for p in usable], dtype=np.int64)
    short = (free < costs.cache_tokens) if costs.cache_tokens > 0 else np.zeros(len(usable), dtype=bool)
    penalty = np.where(short, costs.cache_penalty_ms, 0.0)
    edges = None
    if costs.forwarding:
        find = {peer.peer_id: index for index, peer in enumerate(usable)}.get
        source: list[int] = []
        target: list[int] = []
        ms: list[float] = []
        for index, p in enumerate(usable):
            for other, value in p.pings.items():
                position = find(other, index)  # unknown peers and itself: skipped
                if position != index:
                    source.append(index)
                    target.append(position)
                    ms.append(value)
        if source:
            one_way = np.maximum(np.array(ms, dtype=float), 2 * _MIN_MS) / 2
            edges = (np.array(source, dtype=np.int64), np.array(target, dtype=np.int64), one_way)
        enter, link, back = rtt / 2 + penalty, rtt / 2 + penalty, rtt / 2
    else:
        enter, link, back = rtt + penalty, rtt + penalty, np.zeros(len(usable))
    return _Search(
        peers=usable,
        starts=np.array([p.start_layer for p in usable]),
        ends=np.minimum(np.array([p.end_layer for p in usable]), end),
        tau=layer_ms(usable, costs),
        penalty=penalty,
        relayed=relayed,
        enter=enter,
        link=link,
        back=back,
        edges=edges,
        forwarding=costs.forwarding,
    )


def find_route(
    records: Iterable[PeerRecord],
    start: int,
    end: int,
    *,
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
    costs: RouteCosts | None = None,
) -> list[Hop]:
    """A chain of hops covering ``[start, end)`` exactly, in order, at the lowest expected cost.

    Skips "leaving" peers and the peer ids in ``exclude`` (banned after a failure). Among next
    hops within ``costs.slack`` of the best (exact ties when 0) it picks at random with ``rng``
    (seed it for reproducible tests). Raises MissingLayersError naming the uncovered spans when
    no chain exists.
    """
    _check_range(start, end)
    records = list(records)
    costs = costs or RouteCosts()
    usable = _usable(records, exclude)
    if start == end:
        return []
    usable = [p for p in usable if p.start_layer < end and p.end_layer > start]
    if _missing(usable, start, end):
        model_name = records[0].model_name if records else ""
        raise MissingLayersError(model_name, _missing(usable, start, end))
    rng = rng if rng is not None else random.Random()
    search = _prepare(usable, end, costs)

    best = np.full(len(usable), np.inf)  # running minimum over exits of (exit * tau + what follows)
    best_exit = np.zeros(len(usable), dtype=np.int64)
    for boundary in range(end - 1, start - 1, -1):
        active = (search.starts <= boundary) & (search.ends > boundary)
        exit_cost = (boundary + 1) * search.tau + search.next_costs(boundary + 1, end)
        improved = active & (exit_cost < best)
        best = np.where(improved, exit_cost, best)
        best_exit = np.where(improved, boundary + 1, best_exit)
        search.after[boundary] = np.where(active, best - boundary * search.tau, np.inf)
        search.exits[boundary] = best_exit.copy()

    route: list[Hop] = []
    previous: int | None = None
    position = start
    while position < end:
        index = _pick(search.arrival(previous) + search.after[position], costs.slack, rng, search.relayed)
        hop_end = int(search.exits[position][index])
        route.append(Hop(usable[index], position, hop_end))
        previous, position = index, hop_end
    return route


def _default_rtt(peer: PeerRecord, costs: RouteCosts) -> float:
    """The round trip assumed for a peer the client has not measured: a relayed one crosses its relay too."""
    return costs.default_rtt_ms + (costs.relay_hop_ms if peer.relay_peer_id else 0.0)


def _pick(totals: np.ndarray, slack: float, rng: random.Random, relayed: np.ndarray | None = None) -> int:
    best = float(totals.min())
    if math.isinf(best):
        raise AssertionError("the backward pass found a route but the forward pass lost it")
    limit = best + abs(best) * max(slack, _TIE)
    choices = np.flatnonzero(totals <= limit)
    if relayed is not None and not relayed[choices].all():
        choices = choices[~relayed[choices]]  # direct peers first: relays are volunteers' shared bandwidth
    return int(choices[rng.randrange(len(choices))])


def route_ms(route: list[Hop], records: Iterable[PeerRecord], costs: RouteCosts | None = None) -> float:
    """The expected milliseconds per token of ``route`` under ``costs`` (what find_route minimised)."""
    costs = costs or RouteCosts()
    usable = _usable(records, ())
    tau = dict(zip((p.peer_id for p in usable), layer_ms(usable, costs), strict=True))
    total = 0.0
    for index, hop in enumerate(route):
        peer_id = hop.peer.peer_id
        rtt = max(costs.rtt_ms.get(peer_id, _default_rtt(hop.peer, costs)), _MIN_MS)
        short = costs.cache_tokens > 0 and hop.peer.free_cache_tokens < costs.cache_tokens
        total += (hop.end - hop.start) * tau.get(peer_id, 0.0) + (costs.cache_penalty_ms if short else 0.0)
        if not costs.forwarding:
            total += rtt
            continue
        if index == 0:
            total += rtt / 2
        else:
            before = route[index - 1].peer
            total += before.pings[peer_id] / 2 if peer_id in before.pings else rtt / 2
        if index == len(route) - 1:
            total += rtt / 2
    return total
