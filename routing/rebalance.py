"""Where a peer should serve: the join rule and the rebalancing rule, as pure functions of a snapshot.

How good a swarm is (``Balance``), best first:
1. fewer uncovered layers (a layer nobody holds makes the model unusable);
2. a higher weakest layer: the smallest total throughput over covered layers (see ``snapshot``);
3. a higher soft minimum: ``(mean over covered layers of T**-16) ** (-1/16)``. It lies between
   the weakest layer and 1.32x it (for 80 layers), and unlike the plain minimum it also rises
   when the second, third... weakest layers rise, which is what moves one step at a time need.

Join rule (``best_start``): a joining peer takes the consecutive span of its length that gives
the best swarm by that order, like Petals' block selection, counting its own rate (throughput per
layer divided by its span length) on each layer it would hold.

Rebalancing rule (``plan_move``), run by each peer on its own re-checks:
- a single move takes one peer's span to another start, same length. It must keep every covered
  layer covered (a peer leaves only layers others also hold), must not lower the weakest layer,
  and must be a clear gain: cover more layers, or raise the soft minimum by at least
  ``min_gain`` (relative; 2% by default);
- of all peers' best moves on the snapshot, only the best one is made (best resulting swarm by
  the order above, ties to the smaller peer id). Every peer computes the same election on the
  same snapshot, so two peers never chase one gap together, which is how Petals' swarms
  oscillate (petals#389: servers deciding on the same view all move, then all move back);
- small swarms (up to ``REPLAN_MAX_PEERS``) are lumpy: one move at a time can get stuck far
  from a good arrangement. There the planner also places every peer afresh (``replan``: a few
  fixed orders, each settled, the best kept) and, when that plan's weakest layer beats what
  single moves would reach by ``REPLAN_MIN_GAIN`` (10%), the swarm walks to it, one peer at a
  time, each step keeping every covered layer covered (``replan_move``).

Why it cannot oscillate, and the bound. Single moves raise the potential (covered layers, soft
minimum) strictly: they cover more layers, or keep the covered set (a move may never uncover one,
so the same count means the same set) and multiply the soft minimum by at least ``1 + min_gain``.
A re-plan depends only on who is in the swarm, not on where they are, so it is the same at every
step of the walk; each peer moves at most once on it, and after it (or after passing on it) the
weakest layer is within the margin of the plan's, so it never starts again. Hence, while
membership stays the same: no swarm state comes back and no peer moves back and forth, and there
are at most ``P`` re-plan steps (small swarms only) plus ``move_bound`` single moves, about 20
after a typical leave (the soft minimum never exceeds ``L ** (1/16)`` times the mean layer total).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from brigade.routing.snapshot import PeerSpan, SwarmSnapshot

SOFTMIN_POWER = 16
DEFAULT_MIN_GAIN = 0.02  # a move must raise the soft minimum by 2% (or cover a layer)
REPLAN_MAX_PEERS = 32  # swarms this small also consider placing every peer afresh
REPLAN_MIN_GAIN = 0.10  # ... and follow that plan only when its weakest layer is 10% higher
PLAN_GAIN = 1e-6  # a plan is computed, not moved through: it settles on any strict gain
_TIE = 1e-9  # relative: floating-point sums in different orders are ties, not gains


@dataclass(frozen=True)
class Balance:
    """How good a swarm is; compare with ``key`` (bigger is better)."""

    uncovered: int  # layers no online peer holds
    weakest: float  # smallest layer total over covered layers (tokens/s); 0 when none is covered
    soft: float  # soft minimum over covered layers (tokens/s)

    def key(self) -> tuple[int, float, float]:
        return (-self.uncovered, self.weakest, self.soft)


def _scores(totals: np.ndarray, covered: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of [K, L] layer totals and coverage: (uncovered, weakest, soft) as [K] arrays."""
    uncovered = (~covered).sum(axis=1)
    values = np.where(covered, np.maximum(totals, 1e-300), np.inf)
    weakest = values.min(axis=1)
    safe = np.where(np.isfinite(weakest), weakest, 1.0)[:, None]
    # soft = min * mean((v/min) ** -p) ** (-1/p); v/min >= 1 keeps every power in (0, 1]
    powers = np.where(covered, (values / safe) ** -SOFTMIN_POWER, 0.0).sum(axis=1)
    count = np.maximum(covered.sum(axis=1), 1)
    soft = safe[:, 0] * (powers / count) ** (-1.0 / SOFTMIN_POWER)
    none = ~covered.any(axis=1)
    weakest = np.where(none, 0.0, weakest)
    soft = np.where(none, 0.0, soft)
    return uncovered, weakest, soft


def balance_of(snapshot: SwarmSnapshot) -> Balance:
    uncovered, weakest, soft = _scores(snapshot.layer_throughput()[None, :], snapshot.layer_coverage()[None, :] > 0)
    return Balance(int(uncovered[0]), float(weakest[0]), float(soft[0]))


@lru_cache(maxsize=512)
def _windows(num_layers: int, length: int) -> np.ndarray:
    """[K, L] bool: row s holds layers [s, s + length), for every start s."""
    starts = np.arange(num_layers - length + 1)[:, None]
    layers = np.arange(num_layers)[None, :]
    windows = (layers >= starts) & (layers < starts + length)
    windows.setflags(write=False)
    return windows


def _best_index(
    uncovered: np.ndarray, weakest: np.ndarray, soft: np.ndarray, allowed: np.ndarray, prefer: int | None
) -> int | None:
    """Index of the best allowed row by (fewest uncovered, highest weakest, highest soft); ties keep
    ``prefer`` when it is among them, else the lowest index."""
    ok = allowed.copy()
    if not ok.any():
        return None
    ok &= uncovered == uncovered[ok].min()
    for values in (weakest, soft):
        top = values[ok].max()
        ok &= values >= top - abs(top) * _TIE
    if prefer is not None and ok[prefer]:
        return prefer
    return int(np.flatnonzero(ok)[0])


def _candidates(
    totals: np.ndarray, coverage: np.ndarray, length: int, rate: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    windows = _windows(len(totals), length)
    covered = (coverage[None, :] + windows) > 0
    uncovered, weakest, soft = _scores(totals[None, :] + rate * windows, covered)
    return covered, uncovered, weakest, soft


def best_start(snapshot: SwarmSnapshot, length: int, throughput: float) -> int:
    """The join rule: where a new peer of ``length`` layers at ``throughput`` (tokens/s per layer) goes."""
    length = max(1, min(length, snapshot.num_layers))
    rate = PeerSpan("new", 0, length, throughput).rate
    _, uncovered, weakest, soft = _candidates(snapshot.layer_throughput(), snapshot.layer_coverage(), length, rate)
    index = _best_index(uncovered, weakest, soft, np.ones(len(uncovered), dtype=bool), None)
    assert index is not None  # every start is allowed
    return index


@dataclass(frozen=True)
class Move:
    """One peer's span moving: the swarm before and after, as the mover's snapshot saw it."""

    peer_id: str
    old: tuple[int, int]
    new: tuple[int, int]
    before: Balance
    after: Balance


def best_move_of(snapshot: SwarmSnapshot, peer_id: str, *, min_gain: float = DEFAULT_MIN_GAIN) -> Move | None:
    """The best allowed move of one peer (see the module docstring), or None to stay."""
    peer = snapshot.get(peer_id)
    if peer is None:
        return None
    return _best_move(peer, snapshot.layer_throughput(), snapshot.layer_coverage(), balance_of(snapshot), min_gain)


def _best_move(peer: PeerSpan, totals: np.ndarray, coverage: np.ndarray, now: Balance, min_gain: float) -> Move | None:
    base = totals.copy()
    base[peer.start : peer.end] -= peer.rate
    base_coverage = coverage.copy()
    base_coverage[peer.start : peer.end] -= 1
    covered, uncovered, weakest, soft = _candidates(base, base_coverage, peer.length, peer.rate)
    keeps_covered = covered[:, coverage > 0].all(axis=1)
    better = (uncovered < now.uncovered) | (
        (uncovered == now.uncovered)
        & (weakest >= now.weakest * (1 - _TIE))
        & (soft >= now.soft * (1 + min_gain))
    )
    index = _best_index(uncovered, weakest, soft, keeps_covered & better, None)
    if index is None or index == peer.start:
        return None
    after = Balance(int(uncovered[index]), float(weakest[index]), float(soft[index]))
    return Move(peer.peer_id, (peer.start, peer.end), (index, index + peer.length), now, after)


def plan_move(
    snapshot: SwarmSnapshot,
    *,
    min_gain: float = DEFAULT_MIN_GAIN,
    movable: Collection[str] | None = None,
    skip: Collection[str] = (),
) -> Move | None:
    """The one move the swarm should make now (the election), or None when it is balanced.

    ``movable``: the peers that may move (None = all); ``skip``: peers that were elected before
    and did not move (fixed spans, old versions), so the next best gets its turn. Small swarms
    first follow their re-plan (``replan_move``) when it is clearly better.
    """
    fixed = {peer.peer_id for peer in snapshot.peers
             if peer.peer_id in set(skip) or (movable is not None and peer.peer_id not in movable)}
    if len(snapshot.peers) <= REPLAN_MAX_PEERS:
        move = replan_move(snapshot, fixed=fixed, min_gain=min_gain)
        if move is not None:
            return move
    return _best_single_move(snapshot, fixed, min_gain)


def _best_single_move(snapshot: SwarmSnapshot, fixed: Collection[str], min_gain: float) -> Move | None:
    totals, coverage = snapshot.layer_throughput(), snapshot.layer_coverage()
    now = balance_of(snapshot)
    best: Move | None = None
    for peer in snapshot.peers:  # sorted by id: on a tie the first (smallest id) stays elected
        if peer.peer_id in fixed:
            continue
        move = _best_move(peer, totals, coverage, now, min_gain)
        if move is not None and (best is None or _better(move.after, best.after)):
            best = move
    return best


def settle(snapshot: SwarmSnapshot, *, fixed: Collection[str] = (), min_gain: float = DEFAULT_MIN_GAIN,
           max_moves: int = 10_000) -> SwarmSnapshot:
    """The swarm after single moves have run their course (what the swarm converges to by itself)."""
    for _ in range(max_moves):
        move = _best_single_move(snapshot, fixed, min_gain)
        if move is None:
            break
        snapshot = snapshot.with_peer(snapshot.get(move.peer_id).moved_to(move.new[0]))  # type: ignore[union-attr]
    return snapshot


# Orders in which a re-plan places peers; each is tried and the best plan kept (small swarms are
# lumpy, and no one order wins on all of them).
_REPLAN_ORDERS = (
    lambda p: (-p.rate, p.peer_id),
    lambda p: (-p.length, p.peer_id),
    lambda p: (p.length, p.peer_id),
    lambda p: (-p.throughput, p.peer_id),
)


def replan(snapshot: SwarmSnapshot, *, fixed: Collection[str] = ()) -> SwarmSnapshot:
    """Every movable peer placed afresh: the fixed ones where they are, then the others one by one
    with the join rule (in a few orders: by rate, by length both ways, by throughput), each plan
    then settled by single moves of any strict gain (a plan costs no real moves); the best plan
    wins, ties to the earlier order.

    It depends on who is in the swarm, not on where they are now, so every peer computes the same
    plan at every step of the way there (and it is computed once per membership: memoised).
    """
    fixed = set(fixed)
    pinned = tuple(peer for peer in snapshot.peers if peer.peer_id in fixed)
    free = tuple(peer.moved_to(0) for peer in snapshot.peers if peer.peer_id not in fixed)
    return _replan(snapshot.num_layers, pinned, free)


@lru_cache(maxsize=32)
def _replan(num_layers: int, pinned: tuple[PeerSpan, ...], free: tuple[PeerSpan, ...]) -> SwarmSnapshot:
    fixed = {peer.peer_id for peer in pinned}
    best: tuple[Balance, SwarmSnapshot] | None = None
    for order in _REPLAN_ORDERS:
        placed = SwarmSnapshot(num_layers, pinned)
        for peer in sorted(free, key=order):
            placed = placed.with_peer(peer.moved_to(best_start(placed, peer.length, peer.throughput)))
        placed = settle(placed, fixed=fixed, min_gain=PLAN_GAIN)
        balance = balance_of(placed)
        if best is None or _better(balance, best[0]):
            best = (balance, placed)
    assert best is not None
    return best[1]


def replan_move(
    snapshot: SwarmSnapshot, *, fixed: Collection[str] = (), min_gain: float = DEFAULT_MIN_GAIN
) -> Move | None:
    """The next step towards the re-plan, when the re-plan beats what single moves would reach.

    The swarm follows the plan only when its weakest layer is ``REPLAN_MIN_GAIN`` above the
    weakest layer of ``settle(snapshot)`` and there is an order of steps (each peer moving once,
    straight to its planned start) that never uncovers a layer; the weakest layer may dip on the
    way. Once a swarm has followed or passed on a plan, its weakest layer is within the margin of
    the plan's, so the same plan never starts again: no cycles.
    """
    target = replan(snapshot, fixed=fixed)
    goal = balance_of(target)
    baseline = balance_of(settle(snapshot, fixed=fixed, min_gain=min_gain))
    if goal.uncovered > baseline.uncovered or (
        goal.uncovered == baseline.uncovered and goal.weakest < baseline.weakest * (1 + REPLAN_MIN_GAIN)
    ):
        return None
    path = _transit(snapshot, target)
    return path[0] if path else None


def _transit(snapshot: SwarmSnapshot, target: SwarmSnapshot) -> list[Move] | None:
    """Steps from ``snapshot`` to ``target`` that keep every covered layer covered, best swarm first;
    None when some peer cannot get to its place that way."""
    path: list[Move] = []
    current = snapshot
    while True:
        pending = [peer for peer in current.peers if (planned := target.get(peer.peer_id)) is not None
                   and planned.start != peer.start]
        if not pending:
            return path
        coverage = current.layer_coverage()
        now = balance_of(current)
        best: tuple[Move, SwarmSnapshot] | None = None
        for peer in pending:
            planned = target.get(peer.peer_id)
            assert planned is not None
            after = current.with_peer(planned)
            if not (after.layer_coverage()[coverage > 0] > 0).all():
                continue
            move = Move(peer.peer_id, (peer.start, peer.end), (planned.start, planned.end), now, balance_of(after))
            if best is None or _better(move.after, best[0].after):
                best = (move, after)
        if best is None:
            return None
        path.append(best[0])
        current = best[1]


def _better(a: Balance, b: Balance) -> bool:
    """Strictly better by the order, with floating-point ties counted as ties."""
    if a.uncovered != b.uncovered:
        return a.uncovered < b.uncovered
    for x, y in ((a.weakest, b.weakest), (a.soft, b.soft)):
        if abs(x - y) > max(abs(x), abs(y)) * _TIE:
            return x > y
    return False


def move_bound(snapshot: SwarmSnapshot, *, min_gain: float = DEFAULT_MIN_GAIN) -> int:
    """The most moves ``plan_move`` can make from this snapshot before membership changes.

    Each move covers more layers, or keeps the covered set and multiplies the soft minimum by
    ``1 + min_gain``; the soft minimum never exceeds ``L ** (1/16)`` times the mean layer total
    (the weakest layer is at most the mean). While layers are uncovered, the soft minimum is
    only known to be at least the slowest peer's rate.
    """
    if not snapshot.peers:
        return 0
    now = balance_of(snapshot)
    layers = snapshot.num_layers
    ceiling = layers ** (1 / SOFTMIN_POWER) * snapshot.total_throughput() / max(1, layers - now.uncovered)

    def steps(floor: float) -> int:
        return max(0, math.floor(math.log(max(ceiling / floor, 1.0)) / math.log1p(min_gain)))

    if now.uncovered == 0:
        return steps(now.soft)
    slowest = min(peer.rate for peer in snapshot.peers)
    return now.uncovered + (now.uncovered + 1) * steps(slowest)
