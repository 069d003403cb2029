"""The periodic re-check: is this peer still where the swarm needs it most, and if not, move.

Every ``period_s`` (±50% jitter, so peers started together do not decide together) the peer reads
the swarm and runs the election of ``routing.rebalance.plan_move`` on it. Only the elected peer
moves; the others wait. Safeguards against the ways real swarms differ from the pure model:

- the swarm must be settled: while any peer is leaving (draining, or moving, which looks the
  same) nobody decides, since that peer's layers are about to change;
- this peer's own record must show its current span (its last announce reached the DHT);
- patience: when the same peer is elected ``patience`` checks in a row and does not move (its
  span is fixed by its operator, or it runs an older version), it is skipped for a while, so the
  next best gets its turn;
- after moving, this peer sits out ``cooldown_checks`` checks, so its new span is seen by all.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from brigade.protocol.records import PeerRecord
from brigade.routing.rebalance import DEFAULT_MIN_GAIN, Move, plan_move
from brigade.routing.snapshot import SwarmSnapshot

logger = logging.getLogger(__name__)


class Rebalancer:
    """Runs until cancelled; ``check_once`` is one re-check (tests call it directly)."""

    def __init__(
        self,
        self_id: str,
        num_layers: int,
        span: Callable[[], tuple[int, int]],
        read_records: Callable[[], Awaitable[list[PeerRecord]]],
        move: Callable[[int, int], Awaitable[bool]],
        *,
        period_s: float = 120.0,
        min_gain: float = DEFAULT_MIN_GAIN,
        patience: int = 3,
        skip_checks: int = 10,
        cooldown_checks: int = 2,
        rng: random.Random | None = None,
    ):
        """``span()`` is this peer's current span; ``move(start, end)`` moves it and says whether it
        did. No I/O here."""
        self.self_id = self_id
        self.num_layers = num_layers
        self._span = span
        self._read_records = read_records
        self._move = move
        self.period_s = period_s
        self.min_gain = min_gain
        self.patience = patience
        self.skip_checks = skip_checks
        self.cooldown_checks = cooldown_checks
        self._rng = rng or random.Random()
        self._elected: tuple[str, tuple[int, int]] | None = None
        self._elected_count = 0
        self._skipped: dict[str, int] = {}  # peer id -> checks left before it may be elected again
        self._cooldown = 0
        self.moves: list[Move] = []

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s * self._rng.uniform(0.5, 1.5))
            try:
                await self.check_once()
            except Exception:  # one failed check (DHT trouble, a load error) must not end the loop
                logger.warning("rebalancing check failed; trying again next period", exc_info=True)

    async def check_once(self) -> Move | None:
        """One re-check; returns the move this peer made, if any."""
        self._skipped = {peer: left - 1 for peer, left in self._skipped.items() if left > 1}
        if self._cooldown > 0:
            self._cooldown -= 1
            return None
        records = await self._read_records()
        leaving = sorted({r.peer_id for r in records if r.state == "leaving" and r.peer_id != self.self_id})
        if leaving:
            logger.debug("not rebalancing while %s leave or move", ", ".join(leaving))
            return None
        snapshot = SwarmSnapshot.from_records(records, self.num_layers)
        mine = snapshot.get(self.self_id)
        if mine is None or (mine.start, mine.end) != self._span():
            logger.debug("not rebalancing: the swarm does not show this peer's current span yet")
            return None
        move = plan_move(snapshot, min_gain=self.min_gain, skip=set(self._skipped))
        if move is None:
            self._elected, self._elected_count = None, 0
            return None
        if move.peer_id != self.self_id:
            self._wait_for(move)
            return None
        self._elected, self._elected_count = None, 0
        logger.info("moving from layers %d:%d to %d:%d: weakest layer %.1f -> %.1f tokens/s, %d -> %d uncovered",
                    *move.old, *move.new, move.before.weakest, move.after.weakest, move.before.uncovered,
                    move.after.uncovered)
        if not await self._move(*move.new):
            return None
        self.moves.append(move)
        self._cooldown = self.cooldown_checks
        return move

    def _wait_for(self, move: Move) -> None:
        elected = (move.peer_id, move.new)
        self._elected_count = self._elected_count + 1 if elected == self._elected else 1
        self._elected = elected
        if self._elected_count >= self.patience:
            logger.info("peer %s was elected to move to %d:%d %d times and did not; skipping it for %d checks",
                        move.peer_id, *move.new, self._elected_count, self.skip_checks)
            self._skipped[move.peer_id] = self.skip_checks
            self._elected, self._elected_count = None, 0
