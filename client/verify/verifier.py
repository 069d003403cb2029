"""Result verification: a share of each hop's finished windows re-run on another peer and compared.

A peer could return plausible garbage (skip layers, add noise, run a cheaper model) and nothing in
the protocol would notice. So a session checks a random share of its work (``verify_rate``, 5% of
windows by default; a window is ``verify_window`` steps): for a chosen window ``[a, b)`` and each hop
of the route, it reads back the hop's inputs for ``[0, b)`` (the client's own log, or the previous
peer's kept outputs) and the hop's outputs for the window (``History``), binds both to the peers'
signed attestations (``client/verify/evidence.py``; each was checked on arrival, ``client/arrival.py``),
re-runs the inputs as one ordinary prefill (in messages under the cap) on another peer serving the
same layers, and compares the window's outputs with a tolerance for the two peers' precisions
(``client/verify/compare.py``). On a mismatch a third peer decides: the peer that disagrees
with the other two is distrusted (``PeerStanding.distrust``: every session of the model
rebuilds its route without it at its next step) and reported, with the attestations that show what
it signed. A peer whose kept outputs contradict its own signatures is dropped the same way.

To the re-running peer a check is an ordinary session: same client identity, batch, padding and
length, one prefill. The checked peer learns of a check only afterwards (its outputs are read
back), when what it signed can no longer change.

The checks never hold up the session: one background task per session (started on the session's
loop at the first due window, cancelled at close) works through due windows one at a time, from a
bounded queue (a due window that does not fit is skipped and counted), each hop's check bounded in
time, with hashing and comparisons on a worker thread. A History refused or stalled by a hop still
on the route fails the check (kind ``refused``: else refusing would dodge every check); any other
failure (a peer gone, no other peer serving the layers) skips that check and counts it; nothing a
check does can fail a step. Checks still running when the session closes are cancelled: the peers drop a
closed session's kept outputs anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from brigade.client.verify.compare import WindowSchedule
from brigade.client.verify.evidence import AttestationChain
from brigade.client.verify.hop_check import HopCheck
from brigade.client.verify.outcomes import CheckResult, VerificationReport, VerificationStats
from brigade.client.verify.windows import HopSnapshot, Window

if TYPE_CHECKING:
    from brigade.client.config import ClientConfig
    from brigade.client.hops import HopStream
    from brigade.client.remote import RemoteSwarm
    from brigade.client.standing import PeerStanding

logger = logging.getLogger(__name__)

MAX_ROLLBACKS_KEPT = 1024  # rollbacks remembered to tell a superseded window from a lying peer
MAX_RESULTS_KEPT = 1024  # per-check results kept for tests and benchmarks


class SessionView(Protocol):
    """What a verifier and its checks see of a session: read-only facts, no state to write into."""

    config: ClientConfig
    swarm: RemoteSwarm
    standing: PeerStanding
    batch_size: int
    max_length: int
    pad_lengths: list[int]
    hops: list[HopStream]
    step_listeners: list[Any]
    close_hooks: list[Any]

    def rope_lengths_for(self, start: int, end: int) -> list[int]: ...

    def message_positions(self) -> int: ...


class ResultVerifier:
    """Checks a share of one session's windows; attach with ``ResultVerifier.attach(session)``."""

    def __init__(self, session: SessionView, rng: random.Random | None = None):
        self.session = session
        self.standing = session.standing
        self.config = session.config
        self.stats = VerificationStats()
        self.results: deque[CheckResult] = deque(maxlen=MAX_RESULTS_KEPT)
        self._rng = rng or random.SystemRandom()  # peers must not be able to predict the checked windows
        self._schedule = WindowSchedule(self.config.verify_rate, self.config.verify_schedule, self._rng,
                                        self.config.verify_extra_rate if self.config.verify_schedule == "stratified"
                                        else 0.0)
        self._chains: dict[str, AttestationChain] = {}  # per hop session id
        # per hop session id: the previous hop's session id when it was first seen, and whether that
        # previous hop was replaced since (its inputs before the failover then came from a peer whose
        # session is gone: the new one's outputs are a replay, not the bytes this hop received)
        self._upstream: dict[str, tuple[str | None, bool]] = {}
        self._length = 0  # the session's length after the last step seen
        self._window_start: int | None = None
        self._window_steps = 0
        self._rollbacks: deque[tuple[int, int]] = deque(maxlen=MAX_ROLLBACKS_KEPT)  # (seq, position)
        self._rollback_seq = 0
        self._queue: asyncio.Queue[Window] = asyncio.Queue(maxsize=max(1, self.config.verify_max_pending))
        self._worker: asyncio.Task[None] | None = None
        self._running = False  # a window's checks are under way
        self._closed = False

    @classmethod
    def attach(cls, session: SessionView, rng: random.Random | None = None) -> ResultVerifier | None:
        """Hooks a verifier into ``session`` (after each step, and at close); None when checks are off."""
        if session.config.verify_rate <= 0:
            return None
        verifier = cls(session, rng)
        session.step_listeners.append(verifier.on_step)
        session.close_hooks.append(verifier.close)
        return verifier

    @property
    def reports(self) -> list[VerificationReport]:
        """Every verdict of the model's checks so far (the standing keeps them)."""
        return list(self.standing.reports)

    # -- on the step path: bookkeeping only --------------------------------------------------------
    def on_step(self, session: SessionView, start: int, positions: int) -> None:
        """After each completed step: follows every hop's attestations; queues the window when due."""
        end = start + positions
        for stream in session.hops:
            chain = self._chains.setdefault(stream.session_id, AttestationChain())
            chain.ingest(stream.attestations)
            chain.finish_step(end)
        for index, stream in enumerate(session.hops):
            previous = session.hops[index - 1].session_id if index > 0 else None
            seen, replaced = self._upstream.setdefault(stream.session_id, (previous, False))
            if seen != previous and not replaced:
                self._upstream[stream.session_id] = (seen, True)
        live = {stream.session_id for stream in session.hops}
        for session_id in [key for key in self._chains if key not in live]:
            del self._chains[session_id]  # that hop was replaced by a failover
        for session_id in [key for key in self._upstream if key not in live]:
            del self._upstream[session_id]
        if start < self._length:
            self._rollback_seq += 1
            self._rollbacks.append((self._rollback_seq, start))
        self._length = end
        self._window_start = start if self._window_start is None else min(self._window_start, start)
        self._window_steps += 1
        if self._window_steps < max(1, self.config.verify_window):
            return
        window_start, self._window_start, self._window_steps = self._window_start, None, 0
        index = self.stats.windows
        self.stats.windows += 1
        if self._closed or not self._schedule.due(index):
            return
        self.stats.due += 1
        if self._queue.full():
            self.stats.skip("busy")
            return
        hops = [self._snapshot(index, end) for index in range(len(session.hops))]
        self._queue.put_nowait(Window(window_start, end, self._rollback_seq, hops, session.rope_lengths_for(0, end)))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="result-checks")
            self._worker.add_done_callback(_log_crash)

    def _snapshot(self, index: int, end: int) -> HopSnapshot:
        stream = self.session.hops[index]
        links = self._chains[stream.session_id].covering(0, end) or []
        if stream.inputs.complete and stream.inputs.length >= end:
            return HopSnapshot(stream, links, stream.inputs.pieces())
        previous = self.session.hops[index - 1] if index > 0 else None
        if self._upstream.get(stream.session_id, (None, False))[1]:
            return HopSnapshot(stream, links, None, unusable="upstream_replaced")
        previous_links = self._chains[previous.session_id].covering(0, end) if previous is not None else None
        return HopSnapshot(stream, links, None, previous, previous_links or [])

    def _superseded(self, window: Window) -> bool:
        """Whether the session rolled back below the window's end since it finished (or lost count)."""
        lost_count = bool(self._rollbacks) and self._rollbacks[0][0] > window.rollback_seq + 1
        return lost_count or any(seq > window.rollback_seq and position < window.end
                                 for seq, position in self._rollbacks)

    # -- in the background -------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            window = await self._queue.get()
            self._running = True
            try:
                for snapshot in window.hops:
                    check = HopCheck(self.session, self.standing, self.stats, self._rng, window, snapshot,
                                     self._superseded)
                    self.results.append(await check.run())
            finally:
                self._running = False
                self._queue.task_done()

    async def drain(self, timeout_s: float) -> None:
        """Waits until every queued check is done (tests and benchmarks, before closing a session)."""
        async with asyncio.timeout(timeout_s):
            await self._queue.join()

    async def close(self) -> None:
        """Cancels the checks still queued or running (the session is closing)."""
        self._closed = True
        pending = self._queue.qsize() + int(self._running)
        if pending:
            self.stats.skip("cancelled", pending)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("result checks stopped: %r", task.exception())


__all__ = ["CheckResult", "ResultVerifier", "VerificationReport", "VerificationStats"]
