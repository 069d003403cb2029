"""Result verification: a share of each hop's finished windows re-run on another peer and compared.

A peer could return plausible garbage (skip layers, add noise, run a cheaper model) and nothing in
the protocol would notice. So a session checks a random share of its work (``verify_rate``, 5% of
windows by default; a window is ``verify_window`` steps): for a chosen window ``[a, b)`` and each hop
of the route, it reads back the hop's inputs for ``[0, b)`` (the client's own log, or the previous
peer's kept outputs) and the hop's outputs for the window (``History``), binds both to the peers'
signed attestations (``client/evidence.py``), re-runs the inputs as one ordinary prefill on another
peer serving the same layers, and compares the window's outputs with a tolerance for the two
peers' precisions (``client/checking.py``). On a mismatch a third peer decides: the peer that
disagrees with the other two is dropped from the session (``InferenceSession.distrusted``: the
route is rebuilt without it at the next step) and reported, with the attestations that show what
it signed. A peer whose kept outputs contradict its own signatures is dropped the same way.

To the re-running peer a check is an ordinary session: same client identity, batch, padding and
length, one prefill. The checked peer learns of a check only afterwards (its outputs are read
back), when what it signed can no longer change.

The checks never hold up the session: one background task per session (started on the session's
loop at the first due window, cancelled at close) works through due windows one at a time, from a
bounded queue (a due window that does not fit is skipped and counted), each hop's check bounded in
time, with hashing and comparisons on a worker thread. Any failure (a peer gone, a History
refused, no other peer serving the layers) skips that check and counts it; nothing a check does
can fail a step. Checks still running when the session closes are cancelled: the peers drop a
closed session's kept outputs anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from brigade.client.checking import WindowSchedule, choose_checker, disagreement, precision_of, tolerance_of, valid_rows
from brigade.client.evidence import AttestationChain, Link, badly_signed, first_mismatch
from brigade.client.hops import HopFailure, HopStream
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import check_attestation, tensor_digest
from brigade.protocol.errors import BrigadeError
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import WIRE_DTYPES, decode, encode
from brigade.protocol.tokens import make_token
from brigade.routing.route import Hop

if TYPE_CHECKING:
    from brigade.client.session import InferenceSession

logger = logging.getLogger(__name__)

MAX_ROLLBACKS_KEPT = 1024  # rollbacks remembered to tell a superseded window from a lying peer
MAX_RESULTS_KEPT = 1024  # per-check results kept for tests and benchmarks
CHECKER_TRIES = 2  # re-running peers tried in turn when one fails


@dataclass
class VerificationStats:
    """What the checks of one session did; counts are per hop check unless marked per window."""

    windows: int = 0  # finished windows
    due: int = 0  # windows chosen for checking
    compared: int = 0  # hop checks that got as far as comparing two results
    passed: int = 0
    caught: int = 0  # verdicts that dropped a peer (outvoted or self-contradicting)
    unresolved: int = 0  # disagreements a third peer could not settle (or no third peer)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> hop checks ("busy", "cancelled": windows)
    rerun_positions: int = 0  # positions (all sequences) recomputed by other peers: the compute overhead
    seconds: float = 0.0  # wall time spent in checks, off the session's critical path

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count


@dataclass
class CheckResult:
    """One hop check's outcome (for tests, benchmarks and logs)."""

    peer_id: str
    precision: str
    layers: tuple[int, int]
    window: tuple[int, int]
    outcome: str = ""  # "passed" | "caught" | "unresolved" | "skipped:<reason>"
    checker: str = ""  # "peer_id(precision)" of the re-running peer
    third: str = ""  # ... and of the one that settled a disagreement
    scores: dict[str, float] = field(default_factory=dict)  # "suspect/checker" etc. -> score (above 1 disagrees)
    accused: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class VerificationReport:
    """Evidence that a peer returned wrong results: what it signed, and what others signed instead."""

    kind: str  # "outvoted": two peers agree against it; "contradiction": what it hands back is not what it
    # signed; "inconsistent": two neighbours signed different bytes for one handover (one of them lies)
    accused: list[str]
    layers: tuple[int, int]
    window: tuple[int, int]
    session_id: str  # the accused's session on its peer (what its attestations name)
    detail: str
    scores: dict[str, float] = field(default_factory=dict)
    attestations: list[pb.Attestation] = field(default_factory=list)  # the accused's, for the positions involved
    witnesses: dict[str, list[pb.Attestation]] = field(default_factory=dict)  # other peer id -> its attestations


@dataclass
class _HopSnapshot:
    """What one hop's check needs, taken when its window finished."""

    stream: HopStream
    links: list[Link]  # its attestations tiling [0, b) (empty when some position has none)
    logged_inputs: torch.Tensor | None  # [B, b, H] as this client sent them, when it holds them
    previous: HopStream | None = None  # otherwise its inputs are this hop's kept outputs
    previous_links: list[Link] = field(default_factory=list)


@dataclass
class _Window:
    start: int
    end: int
    rollback_seq: int  # rollbacks counted when it finished: a later one below ``end`` supersedes it
    hops: list[_HopSnapshot]


@dataclass
class _Rerun:
    peer: PeerRecord
    outputs: torch.Tensor  # [B, b - a, H]: the window's positions
    links: list[Link]  # its attestations over [0, b)
    session_id: str


class _Skip(Exception):
    """This hop's check cannot be made; ``reason`` names the counter it adds to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


class _Verdict(Exception):
    """The check ended in a verdict already recorded on its result."""


class _BadWitness(Exception):
    """A re-running peer answered something malformed: ask another one."""


class ResultVerifier:
    """Checks a share of one session's windows; attach with ``ResultVerifier.attach(session)``."""

    def __init__(self, session: InferenceSession, rng: random.Random | None = None):
        self.session = session
        self.config = session.config
        self.stats = VerificationStats()
        self.results: deque[CheckResult] = deque(maxlen=MAX_RESULTS_KEPT)
        self._rng = rng or random.SystemRandom()  # peers must not be able to predict the checked windows
        self._schedule = WindowSchedule(self.config.verify_rate, self.config.verify_schedule, self._rng)
        self._wire = WIRE_DTYPES[self.config.wire_dtype]
        self._chains: dict[str, AttestationChain] = {}  # per hop session id
        self._length = 0  # the session's length after the last step seen
        self._window_start: int | None = None
        self._window_steps = 0
        self._rollbacks: deque[tuple[int, int]] = deque(maxlen=MAX_ROLLBACKS_KEPT)  # (seq, position)
        self._rollback_seq = 0
        self._queue: asyncio.Queue[_Window] = asyncio.Queue(maxsize=max(1, self.config.verify_max_pending))
        self._worker: asyncio.Task[None] | None = None
        self._running = False  # a window's checks are under way
        self._closed = False

    @classmethod
    def attach(cls, session: InferenceSession, rng: random.Random | None = None) -> ResultVerifier | None:
        """Hooks a verifier into ``session`` (after each step, and at close); None when checks are off."""
        if session.config.verify_rate <= 0:
            return None
        verifier = cls(session, rng)
        session.step_listeners.append(verifier.on_step)
        session.close_hooks.append(verifier.close)
        return verifier

    # -- on the step path: bookkeeping only --------------------------------------------------------
    def on_step(self, session: InferenceSession, start: int, positions: int) -> None:
        """After each completed step: follows every hop's attestations; queues the window when due."""
        end = start + positions
        for stream in session.hops:
            chain = self._chains.setdefault(stream.session_id, AttestationChain())
            chain.ingest(stream.attestations)
            chain.finish_step(end)
        live = {stream.session_id for stream in session.hops}
        for session_id in [key for key in self._chains if key not in live]:
            del self._chains[session_id]  # that hop was replaced by a failover
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
        self._queue.put_nowait(_Window(window_start, end, self._rollback_seq, hops))
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="result-checks")
            self._worker.add_done_callback(_log_crash)

    def _snapshot(self, index: int, end: int) -> _HopSnapshot:
        stream = self.session.hops[index]
        links = self._chains[stream.session_id].covering(0, end) or []
        if stream.inputs.complete and stream.inputs.length >= end:
            return _HopSnapshot(stream, links, stream.inputs.read(end))
        previous = self.session.hops[index - 1] if index > 0 else None
        previous_links = self._chains[previous.session_id].covering(0, end) if previous is not None else None
        return _HopSnapshot(stream, links, None, previous, previous_links or [])

    # -- in the background -------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            window = await self._queue.get()
            self._running = True
            try:
                for hop in window.hops:
                    await self._check_hop(window, hop)
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

    async def _check_hop(self, window: _Window, snapshot: _HopSnapshot) -> None:
        began = time.monotonic()
        hop = snapshot.stream.hop
        result = CheckResult(hop.peer.peer_id, precision_of(hop.peer), (hop.start, hop.end), (window.start, window.end))
        try:
            async with asyncio.timeout(self.config.verify_timeout_s):
                if not await self._anyone_else(snapshot):
                    raise _Skip("no_checker", f"no other peer serves layers {hop.start}:{hop.end}")
                inputs, outputs = await self._read_back(window, snapshot, result)
                await self._judge(window, snapshot, inputs, outputs, result)
        except _Verdict:
            pass
        except _Skip as skip:
            result.outcome = f"skipped:{skip.reason}"
            self.stats.skip(skip.reason)
            logger.debug("result check of %s at layers %d:%d, positions %d:%d skipped: %s", hop.peer.peer_id,
                         hop.start, hop.end, window.start, window.end, skip)
        except TimeoutError:
            result.outcome = "skipped:timeout"
            self.stats.skip("timeout")
        except Exception:  # a bug here must never reach the session
            result.outcome = "skipped:error"
            self.stats.skip("error")
            logger.exception("a result check failed; the session goes on")
        result.seconds = time.monotonic() - began
        self.stats.seconds += result.seconds
        self.results.append(result)

    async def _anyone_else(self, snapshot: _HopSnapshot) -> bool:
        """Whether another usable peer serves the hop's layers (else reading anything back is wasted)."""
        hop = snapshot.stream.hop
        records = await self.session.swarm.records()
        exclude = self.session.distrusted | self.session.bans.banned()
        other = choose_checker(records, (hop.start, hop.end), [hop.peer], exclude, (), tolerance_of, self._rng)
        return other is not None

    async def _read_back(self, window: _Window, snapshot: _HopSnapshot,
                         result: CheckResult) -> tuple[torch.Tensor, torch.Tensor]:
        """The hop's inputs [B, b, H] and window outputs [B, b - a, H], each bound to what peers signed."""
        stream, start, end = snapshot.stream, window.start, window.end
        if stream.peer_id in self.session.distrusted:
            raise _Skip("already_dropped")
        outputs_links = _within(snapshot.links, start, end)
        if outputs_links is None or (snapshot.logged_inputs is None and not snapshot.previous_links):
            raise _Skip("unattested", "some positions have no attestation (a partial rollback)")
        if snapshot.logged_inputs is not None:
            inputs = snapshot.logged_inputs.to(self._wire)
        else:
            assert snapshot.previous is not None
            inputs = await self._history(snapshot.previous, 0, end, result)
        first = outputs_links[0].start  # the attestation holding ``start`` may begin before it (a prefill)
        outputs = await self._history(stream, first, end, result)
        if any(seq > window.rollback_seq and position < end for seq, position in self._rollbacks) or (
                self._rollbacks and self._rollbacks[0][0] > window.rollback_seq + 1):
            raise _Skip("superseded", "the session rolled back into the window since")
        await self._bind(snapshot, inputs, outputs, outputs_links, result)
        return inputs, outputs[:, start - first :]

    async def _bind(self, snapshot: _HopSnapshot, inputs: torch.Tensor, outputs: torch.Tensor,
                    outputs_links: list[Link], result: CheckResult) -> None:
        """Checks what was read back against what the peers signed; drops a peer that contradicts itself.

        The hop's own signatures bind its outputs, and the inputs it says it received; where the
        inputs were read from the previous peer, that peer's signatures bind them too. An honest
        peer never contradicts itself, and two honest neighbours never disagree about a handover
        (the bytes one signs as sent are the bytes the other signs as received).
        """
        stream, previous = snapshot.stream, snapshot.previous
        for peer_stream, links in ((stream, snapshot.links), (previous, snapshot.previous_links)):
            if peer_stream is None or not links:
                continue
            record = peer_stream.hop.peer
            bad = await asyncio.to_thread(badly_signed, links, bytes.fromhex(record.public_key), record.peer_id,
                                          peer_stream.session_id, (peer_stream.hop.start, peer_stream.hop.end))
            if bad is not None:
                self._contradiction(result, peer_stream, [bad],
                                    f"its attestation for position {bad.start} is not validly signed for its session")
        first = outputs_links[0].start
        wrong = await asyncio.to_thread(first_mismatch, outputs, first, outputs_links, "output_sha256", self._wire)
        if wrong is not None:
            self._contradiction(result, stream, _around(outputs_links, wrong),
                                f"its kept output at position {wrong} is not what it signed for")
        if previous is not None:
            links = snapshot.previous_links
            wrong = await asyncio.to_thread(first_mismatch, inputs, 0, links, "output_sha256", self._wire)
            if wrong is not None:
                self._contradiction(result, previous, _around(links, wrong),
                                    f"its kept output at position {wrong} is not what it signed for")
        wrong = await asyncio.to_thread(first_mismatch, inputs, 0, snapshot.links, "input_sha256", self._wire)
        if wrong is not None and previous is None:  # this client sent those bytes itself
            self._contradiction(result, stream, _around(snapshot.links, wrong),
                                f"it signed for an input at position {wrong} that this client did not send")
        if wrong is not None and previous is not None:
            self._accuse(result, "inconsistent", [previous.peer_id, stream.peer_id], stream.session_id,
                         _around(snapshot.links, wrong),
                         {previous.peer_id: _attestations(_around(snapshot.previous_links, wrong))},
                         f"{previous.peer_id} signed an output at position {wrong} that {stream.peer_id} signed "
                         "for receiving differently: one of the two lies")
        if inputs.shape[2] != outputs.shape[2]:
            raise _Skip("error", f"inputs of width {inputs.shape[2]}, outputs of {outputs.shape[2]}")

    async def _judge(self, window: _Window, snapshot: _HopSnapshot, inputs: torch.Tensor, outputs: torch.Tensor,
                     result: CheckResult) -> None:
        """Re-runs the hop's inputs on another peer; on a disagreement, a third one decides."""
        stream, start, end = snapshot.stream, window.start, window.end
        suspect = stream.hop.peer
        layers = (stream.hop.start, stream.hop.end)
        window_inputs = inputs[:, start:end]
        valid = valid_rows(self.session.pad_lengths, start, end)
        busy = {hop.peer.peer_id for hop in self.session.route}

        async def score(first: PeerRecord, first_out: torch.Tensor, second: PeerRecord, second_out: torch.Tensor,
                        name: str) -> float:
            scale = self.config.verify_tolerance_scale
            tolerance = tolerance_of(first, scale) + tolerance_of(second, scale)
            value = await asyncio.to_thread(disagreement, window_inputs, first_out, second_out, valid, tolerance)
            result.scores[name] = value
            return value

        checked = await self._rerun_somewhere(layers, [suspect], busy, inputs, start)
        result.checker = f"{checked.peer.peer_id}({precision_of(checked.peer)})"
        self.stats.compared += 1
        if await score(suspect, outputs, checked.peer, checked.outputs, "suspect/checker") <= 1.0:
            result.outcome = "passed"
            self.stats.passed += 1
            return
        logger.info("result check: %s and %s disagree on layers %d:%d, positions %d:%d (score %.2f); asking a "
                    "third peer", suspect.peer_id, checked.peer.peer_id, *layers, start, end,
                    result.scores["suspect/checker"])
        try:
            decided = await self._rerun_somewhere(layers, [suspect, checked.peer], busy, inputs, start)
        except _Skip as skip:
            self._unresolved(result, f"no third peer to settle it: {skip}")
            return
        third = decided.peer
        result.third = f"{third.peer_id}({precision_of(third)})"
        suspect_vs_third = await score(suspect, outputs, third, decided.outputs, "suspect/third")
        checker_vs_third = await score(checked.peer, checked.outputs, third, decided.outputs, "checker/third")
        own = _within(snapshot.links, 0, end) or []
        witnesses = {checked.peer.peer_id: _attestations(checked.links), third.peer_id: _attestations(decided.links)}
        if checker_vs_third <= 1.0 < suspect_vs_third:
            self._accuse(result, "outvoted", [suspect.peer_id], stream.session_id, own, witnesses,
                         f"its outputs disagree with those of {result.checker} and {result.third}, which agree")
        elif suspect_vs_third <= 1.0 < checker_vs_third:
            self._accuse(result, "outvoted", [checked.peer.peer_id], checked.session_id, checked.links,
                         {suspect.peer_id: _attestations(own), third.peer_id: _attestations(decided.links)},
                         f"as the re-running peer its outputs disagree with those of {suspect.peer_id} "
                         f"({precision_of(suspect)}) and {result.third}, which agree")
        else:
            self._unresolved(result, "the third peer agrees with both or with neither")

    async def _rerun_somewhere(self, layers: tuple[int, int], against: list[PeerRecord], busy: set[str],
                               inputs: torch.Tensor, start: int) -> _Rerun:
        """Re-runs ``inputs`` on the best peer for ``layers`` independent of ``against`` (another if it fails)."""
        scale = self.config.verify_tolerance_scale
        records = await self.session.swarm.records()
        tried: set[str] = set()
        for _ in range(CHECKER_TRIES):
            exclude = self.session.distrusted | self.session.bans.banned() | tried
            checker = choose_checker(records, layers, against, exclude, busy, lambda r: tolerance_of(r, scale),
                                     self._rng)
            if checker is None:
                break
            tried.add(checker.peer_id)
            try:
                return await self._rerun(checker, layers, inputs, start)
            except (HopFailure, BrigadeError, grpc.RpcError, _BadWitness) as error:
                logger.info("result check: re-running layers %d:%d on %s failed: %s", *layers, checker.peer_id, error)
        if not tried:
            raise _Skip("no_checker", f"no other peer serves layers {layers[0]}:{layers[1]}")
        raise _Skip("checker_failed", f"re-running on {sorted(tried)} failed")

    async def _rerun(self, record: PeerRecord, layers: tuple[int, int], inputs: torch.Tensor, start: int) -> _Rerun:
        """One ordinary session on ``record``: open, one prefill of ``inputs`` ([B, b, H]), close."""
        session = self.session
        stream = await HopStream.open(
            session.swarm, Hop(record, *layers), batch_size=session.batch_size, max_length=session.max_length,
            pad_lengths=session.pad_lengths, keep_outputs=True,  # as every session of a verifying client
        )
        try:
            length = inputs.shape[1]
            await stream.send(pb.InferenceRequest(session_id=stream.session_id, step=pb.Step(
                hidden=encode(inputs, self._wire), start_position=0, step_id=1, step_positions=length)))
            pieces: list[torch.Tensor] = []
            links: list[Link] = []
            public_key = bytes.fromhex(record.public_key)
            while sum(piece.shape[1] for piece in pieces) < length:
                response = await stream.answer(self.config.step_timeout_s)
                if response.WhichOneof("kind") != "result":
                    continue
                answer = response.result
                covered = sum(piece.shape[1] for piece in pieces)
                if answer.start_position != covered or answer.positions <= 0 or covered + answer.positions > length:
                    raise _BadWitness(f"answered positions {answer.start_position}+{answer.positions}")
                att = answer.attestation
                if (att.session_id != stream.session_id or (att.start_layer, att.end_layer) != layers
                        or att.start_position != covered or att.output_sha256 != tensor_digest(answer.hidden)
                        or not check_attestation(att, public_key)):
                    raise _BadWitness("its attestation does not match what it returned")
                output = decode(answer.hidden)
                if tuple(output.shape) != (session.batch_size, answer.positions, inputs.shape[2]):
                    raise _BadWitness(f"answered shape {list(output.shape)}")
                pieces.append(output)
                links.append(Link(att, answer.positions))
            self.stats.rerun_positions += length * session.batch_size
            return _Rerun(record, torch.cat(pieces, dim=1)[:, start:], links, stream.session_id)
        finally:
            stream.cancel()

    async def _history(self, stream: HopStream, start: int, end: int, result: CheckResult) -> torch.Tensor:
        """A hop's kept outputs for ``[start, end)``; in smaller requests when one is over the message cap."""
        swarm = self.session.swarm
        pieces: list[torch.Tensor] = []
        position, step = start, end - start
        while position < end:
            stop = min(end, position + step)
            request = pb.HistoryRequest(
                session_id=stream.session_id, start=position, end=stop,
                token=make_token(swarm.identity, stream.peer_id, "history", stream.session_id.encode()))
            try:
                response = await swarm.stub(stream.hop.peer).History(request, timeout=self.config.step_timeout_s)
                piece = decode(response.hidden)
            except grpc.aio.AioRpcError as error:  # the peer left, the session was replaced, or too big
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and step > 1:
                    step = max(1, step // 8)
                    continue
                raise _Skip("unavailable", f"History of {stream.peer_id} failed: {error.code().name}") from error
            except BrigadeError as error:  # undecodable
                self._contradiction(result, stream, [], f"its History answer is not a valid tensor: {error}")
            if piece.dim() != 3 or piece.shape[0] != self.session.batch_size or piece.shape[1] != stop - position:
                self._contradiction(result, stream, [],
                                    f"History answered shape {list(piece.shape)} for positions {position}:{stop}")
            pieces.append(piece)
            position = stop
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    # -- verdicts ----------------------------------------------------------------------------------
    def _contradiction(self, result: CheckResult, stream: HopStream, links: list[Link], detail: str) -> None:
        self._accuse(result, "contradiction", [stream.peer_id], stream.session_id, links, {}, detail)

    def _accuse(self, result: CheckResult, kind: str, accused: list[str], session_id: str, links: list[Link],
                witnesses: dict[str, list[pb.Attestation]], detail: str) -> None:
        """Drops ``accused`` from the session, reports it with the evidence, and ends the check."""
        report = VerificationReport(
            kind=kind, accused=list(accused), layers=result.layers, window=result.window, session_id=session_id,
            detail=detail, scores=dict(result.scores), attestations=_attestations(links), witnesses=witnesses,
        )
        self.session.distrusted.update(accused)
        self.session.reports.append(report)
        result.outcome = "caught"
        result.accused = list(accused)
        self.stats.caught += 1
        logger.warning("result check (%s): %s at layers %d:%d, positions %d:%d: %s; dropped from this session "
                       "(scores %s; %d attestations kept as evidence)", kind, ", ".join(accused), *result.layers,
                       *result.window, detail, {key: round(value, 3) for key, value in result.scores.items()},
                       len(report.attestations))
        raise _Verdict

    def _unresolved(self, result: CheckResult, detail: str) -> None:
        result.outcome = "unresolved"
        self.stats.unresolved += 1
        logger.warning("result check: %s at layers %d:%d, positions %d:%d disagreed with %s, unresolved: %s "
                       "(scores %s)", result.peer_id, *result.layers, *result.window, result.checker, detail,
                       {key: round(value, 3) for key, value in result.scores.items()})


def _within(links: list[Link], start: int, end: int) -> list[Link] | None:
    """The links of a tiling of [0, end) that cover [start, end), from the one holding ``start``."""
    chosen = [link for link in links if link.length is not None and link.end > start and link.start < end]
    if not chosen or chosen[0].start > start or chosen[-1].end != end:
        return None
    return chosen


def _around(links: list[Link], position: int) -> list[Link]:
    return [link for link in links if link.length is not None and link.start <= position < link.end]


def _attestations(links: list[Link]) -> list[pb.Attestation]:
    return [link.attestation for link in links]


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("result checks stopped: %r", task.exception())
