"""Upper bounds on the best possible weakest layer of a swarm snapshot, from LP and MILP solvers.

"Best possible" is over every placement of the same peers (same span lengths and throughputs,
any starts): the optimum of an integer program. Three bounds, cheapest first, each a valid upper
bound on that optimum:

1. ``lp_bound``: the LP relaxation. Peers of one span length are interchangeable in it (their
   rates add up), so it has one variable per (length, start) and solves in milliseconds even
   for 200 peers. It is tight for big swarms and loose for small ones, where a peer's rate
   cannot really be spread over several starts.
2. ``strengthened_feasible``: for a target ``t``, the LP with two cuts every integer placement
   satisfies: a layer's capped rates ``sum min(rate, t)`` reach ``t``; and if no peer of rate
   >= t holds a layer, at least ``k`` slower ones do (``k`` = fewest slow peers whose rates reach t).
3. ``milp_feasible``: the integer program itself (HiGHS), with those cuts, under a time limit.

``certify(snapshot, achieved, ratio)`` answers whether ``achieved >= ratio * optimum`` is proven,
asking the cheaper bounds first, and returns the bound it used (for printing). The cheapest is
free: no layer can exceed the mean layer total, and for a swarm of a hundred peers or more the LP
optimum is within 0.2% of that mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix, csr_matrix

from brigade.routing.snapshot import SwarmSnapshot


def lp_bound(snapshot: SwarmSnapshot) -> float:
    """The LP relaxation's best weakest layer (peers grouped by span length)."""
    layers = snapshot.num_layers
    rate_by_length: dict[int, float] = {}
    for peer in snapshot.peers:
        rate_by_length[peer.length] = rate_by_length.get(peer.length, 0.0) + peer.rate
    columns = [(length, start) for length in sorted(rate_by_length) for start in range(layers - length + 1)]
    rows, cols, values = [], [], []
    for column, (length, start) in enumerate(columns):
        for layer in range(start, start + length):
            rows.append(layer)
            cols.append(column)
            values.append(-1.0)
    t = len(columns)  # the last variable: the weakest layer
    rows += list(range(layers))
    cols += [t] * layers
    values += [1.0] * layers
    upper = coo_matrix((values, (rows, cols)), shape=(layers, t + 1)).tocsr()
    lengths = sorted(rate_by_length)
    index = {length: i for i, length in enumerate(lengths)}
    equal = coo_matrix(
        (np.ones(len(columns)), ([index[length] for length, _ in columns], range(len(columns)))),
        shape=(len(lengths), t + 1),
    ).tocsr()
    objective = np.zeros(t + 1)
    objective[t] = -1.0
    result = linprog(objective, A_ub=upper, b_ub=np.zeros(layers), A_eq=equal,
                     b_eq=[rate_by_length[length] for length in lengths], bounds=(0, None), method="highs")
    if result.status != 0:
        raise RuntimeError(f"LP failed: {result.message}")
    return float(-result.fun)


def _placement_rows(snapshot: SwarmSnapshot, t: float) -> tuple[csr_matrix, np.ndarray, csr_matrix, int]:
    """Per-peer placement variables x[p, s] and the cut rows for target ``t`` (see module docstring)."""
    layers = snapshot.num_layers
    peers = snapshot.peers
    slow = sorted((peer.rate for peer in peers if peer.rate < t), reverse=True)
    needed = None  # fewest slow peers whose rates reach t
    total = 0.0
    for count, rate in enumerate(slow, start=1):
        total += rate
        if total >= t:
            needed = count
            break
    columns = [(i, start) for i, peer in enumerate(peers) for start in range(layers - peer.length + 1)]
    rows, cols, values = [], [], []
    for column, (i, start) in enumerate(columns):
        peer = peers[i]
        weight = 1.0 if peer.rate >= t else (1.0 / needed if needed else 0.0)
        for layer in range(start, start + peer.length):
            rows.append(layer)
            cols.append(column)
            values.append(-min(peer.rate, t))
            if weight:
                rows.append(layers + layer)
                cols.append(column)
                values.append(-weight)
    upper = coo_matrix((values, (rows, cols)), shape=(2 * layers, len(columns))).tocsr()
    bound = np.r_[np.full(layers, -t), np.full(layers, -1.0)]
    equal = coo_matrix((np.ones(len(columns)), ([i for i, _ in columns], range(len(columns)))),
                       shape=(len(peers), len(columns))).tocsr()
    return upper, bound, equal, len(columns)


def strengthened_feasible(snapshot: SwarmSnapshot, t: float) -> bool:
    upper, bound, equal, count = _placement_rows(snapshot, t)
    result = linprog(np.zeros(count), A_ub=upper, b_ub=bound, A_eq=equal, b_eq=np.ones(len(snapshot.peers)),
                     bounds=(0, 1), method="highs")
    return result.status != 2  # 2 = infeasible; anything else is not a proof


def milp_feasible(snapshot: SwarmSnapshot, t: float, time_limit_s: float) -> bool | None:
    """True/False when HiGHS decides within the time limit, None when it does not."""
    upper, bound, equal, count = _placement_rows(snapshot, t)
    constraints = [LinearConstraint(upper, -np.inf, bound), LinearConstraint(equal, 1, 1)]
    result = milp(np.zeros(count), constraints=constraints, integrality=np.ones(count),
                  bounds=Bounds(0, 1), options={"time_limit": time_limit_s})
    if result.status == 0:
        return True
    if result.status == 2:
        return False
    return None


@dataclass(frozen=True)
class Certificate:
    proven: bool
    bound: float  # an upper bound on the optimum (the tightest this check computed)
    method: str  # "mean", "lp", "strengthened lp" or "milp"

    def ratio(self, achieved: float) -> float:
        return achieved / self.bound if self.bound > 0 else 1.0


def certify(snapshot: SwarmSnapshot, achieved: float, ratio: float, *, milp_time_limit_s: float = 20.0) -> Certificate:
    """Whether ``achieved >= ratio * best possible`` is proven for this snapshot, and how."""
    mean = snapshot.total_throughput() / snapshot.num_layers  # the weakest layer is at most the mean
    if achieved >= ratio * mean:
        return Certificate(True, mean, "mean")
    lp = lp_bound(snapshot)
    if achieved >= ratio * lp:
        return Certificate(True, lp, "lp")
    target = achieved / ratio * (1 + 1e-6)
    if not strengthened_feasible(snapshot, target):
        low, high = achieved, target  # the tightest strengthened bound, for the printed ratio
        for _ in range(12):
            middle = (low + high) / 2
            if strengthened_feasible(snapshot, middle):
                low = middle
            else:
                high = middle
        return Certificate(True, high, "strengthened lp")
    feasible = milp_feasible(snapshot, target, milp_time_limit_s)
    return Certificate(feasible is False, target if feasible is False else lp, "milp")
