"""One result check of one hop over one finished window: read back, bind to signatures, re-run, judge.

``client/verification.py`` decides which windows to check and runs these in the background; a
``HopCheck`` does the work for one hop and ends in exactly one outcome: passed, caught (a peer
dropped from the session and reported), unresolved, or skipped for a named reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from brigade.client.checking import choose_checker, disagreement, precision_of, tolerance_of, valid_rows
from brigade.client.evidence import Link, badly_signed, first_mismatch
from brigade.client.hops import HopFailure, HopStream
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import check_attestation, rope_digest
from brigade.protocol.errors import BadAnswerError, BrigadeError
from brigade.protocol.messages import StepAnswer
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import WIRE_DTYPES, decode, encode
from brigade.protocol.tokens import make_token
from brigade.routing.route import Hop

if TYPE_CHECKING:
    from brigade.client.session import InferenceSession

logger = logging.getLogger(__name__)

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
    accused: list[str] = field(default_factory=list)  # whom a "caught" dropped (the re-running peer, possibly)
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
class HopSnapshot:
    """What one hop's check needs, taken when its window finished."""

    stream: HopStream
    links: list[Link]  # its attestations tiling [0, b) (empty when some position has none)
    logged_inputs: list[torch.Tensor] | None  # what this client sent it (positions from 0 on), when it holds them
    previous: HopStream | None = None  # otherwise its inputs are this hop's kept outputs
    previous_links: list[Link] = field(default_factory=list)
    unusable: str = ""  # why its inputs cannot be had (the reason the check is skipped for), if so


@dataclass
class Window:
    start: int
    end: int
    rollback_seq: int  # rollbacks counted when it finished: a later one below ``end`` supersedes it
    hops: list[HopSnapshot]
    # The call length of each position [0, end) when it finished (length-dependent ropes; [] otherwise): a
    # re-run sends these, not the session's live ones, which a later rollback or recompute rewrites.
    rope_lengths: list[int] = field(default_factory=list)


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


class HopCheck:
    """The check of ``snapshot``'s hop over ``window``; ``run`` it once."""

    def __init__(self, session: InferenceSession, stats: VerificationStats, rng: random.Random, window: Window,
                 snapshot: HopSnapshot, superseded: Callable[[Window], bool]):
        self.session = session
        self.config = session.config
        self.stats = stats
        self.window = window
        self.snapshot = snapshot
        self._rng = rng
        self._superseded = superseded
        self._wire = WIRE_DTYPES[self.config.wire_dtype]
        hop = snapshot.stream.hop
        self.result = CheckResult(hop.peer.peer_id, precision_of(hop.peer), (hop.start, hop.end),
                                  (window.start, window.end))

    async def run(self) -> CheckResult:
        """Never raises (but for cancellation): every failure is a counted skip."""
        began = time.monotonic()
        result = self.result
        try:
            async with asyncio.timeout(self.config.verify_timeout_s):
                if not await self._anyone_else():
                    raise _Skip("no_checker", "no other peer serves the layers")
                inputs, outputs = await self._read_back()
                await self._judge(inputs, outputs)
        except _Verdict:
            pass
        except _Skip as skip:
            result.outcome = f"skipped:{skip.reason}"
            self.stats.skip(skip.reason)
            logger.debug("result check of %s at layers %d:%d, positions %d:%d skipped: %s", result.peer_id,
                         *result.layers, *result.window, skip)
        except TimeoutError:
            result.outcome = "skipped:timeout"
            self.stats.skip("timeout")
        except Exception:  # a bug here must never reach the session
            result.outcome = "skipped:error"
            self.stats.skip("error")
            logger.exception("a result check failed; the session goes on")
        result.seconds = time.monotonic() - began
        self.stats.seconds += result.seconds
        return result

    async def _anyone_else(self) -> bool:
        """Whether another usable peer serves the hop's layers (else reading anything back is wasted)."""
        hop = self.snapshot.stream.hop
        records = await self.session.swarm.records()
        exclude = self.session.distrusted | self.session.bans.banned()
        other = choose_checker(records, (hop.start, hop.end), [hop.peer], exclude, (), tolerance_of, self._rng)
        return other is not None

    # -- reading back --------------------------------------------------------------------------------
    async def _read_back(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The hop's inputs [B, b, H] and window outputs [B, b - a, H], each bound to what peers signed."""
        snapshot, start, end = self.snapshot, self.window.start, self.window.end
        stream = snapshot.stream
        if stream.peer_id in self.session.distrusted:
            raise _Skip("already_dropped")
        if snapshot.unusable:
            raise _Skip(snapshot.unusable, "its inputs came partly from a peer a failover replaced since")
        outputs_links = _within(snapshot.links, start, end)
        if outputs_links is None or (snapshot.logged_inputs is None and not snapshot.previous_links):
            raise _Skip("unattested", "some positions have no attestation (a partial rollback)")
        if snapshot.logged_inputs is not None:
            inputs = await asyncio.to_thread(_joined, snapshot.logged_inputs, end, self._wire)
        else:
            assert snapshot.previous is not None
            inputs = await self._history(snapshot.previous, 0, end)
        first = outputs_links[0].start  # the attestation holding ``start`` may begin before it (a prefill)
        outputs = await self._history(stream, first, end)
        if self._superseded(self.window):
            raise _Skip("superseded", "the session rolled back into the window since")
        await self._bind(inputs, outputs, outputs_links)
        return inputs, outputs[:, start - first :]

    async def _history(self, stream: HopStream, start: int, end: int) -> torch.Tensor:
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
                piece = await asyncio.to_thread(decode, response.hidden)
            except grpc.aio.AioRpcError as error:  # the peer left, the session was replaced, or too big
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and step > 1:
                    step = max(1, step // 8)
                    continue
                raise _Skip("unavailable", f"History of {stream.peer_id} failed: {error.code().name}") from error
            except BrigadeError as error:  # undecodable
                self._contradiction(stream, [], f"its History answer is not a valid tensor: {error}")
            if piece.dim() != 3 or piece.shape[0] != self.session.batch_size or piece.shape[1] != stop - position:
                self._contradiction(stream, [], f"History answered shape {list(piece.shape)} for {position}:{stop}")
            pieces.append(piece)
            position = stop
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    async def _bind(self, inputs: torch.Tensor, outputs: torch.Tensor, outputs_links: list[Link]) -> None:
        """Checks what was read back against what the peers signed; drops a peer that contradicts itself.

        The hop's own signatures bind its outputs, and the inputs it says it received; where the
        inputs were read from the previous peer, that peer's signatures bind them too. An honest
        peer never contradicts itself, and two honest neighbours never disagree about a handover
        (the bytes one signs as sent are the bytes the other signs as received).
        """
        snapshot = self.snapshot
        stream, previous = snapshot.stream, snapshot.previous
        for peer_stream, links in ((stream, snapshot.links), (previous, snapshot.previous_links)):
            if peer_stream is None or not links:
                continue
            record = peer_stream.hop.peer
            bad = await asyncio.to_thread(badly_signed, links, bytes.fromhex(record.public_key), record.peer_id,
                                          peer_stream.session_id, (peer_stream.hop.start, peer_stream.hop.end))
            if bad is not None:
                self._contradiction(peer_stream, [bad],
                                    f"its attestation for position {bad.start} is not validly signed for its session")
        first = outputs_links[0].start
        wrong = await asyncio.to_thread(first_mismatch, outputs, first, outputs_links, "output_sha256", self._wire)
        if wrong is not None:
            self._contradiction(stream, _around(outputs_links, wrong),
                                f"its kept output at position {wrong} is not what it signed for")
        if previous is not None:
            links = snapshot.previous_links
            wrong = await asyncio.to_thread(first_mismatch, inputs, 0, links, "output_sha256", self._wire)
            if wrong is not None:
                self._contradiction(previous, _around(links, wrong),
                                    f"its kept output at position {wrong} is not what it signed for")
        wrong = await asyncio.to_thread(first_mismatch, inputs, 0, snapshot.links, "input_sha256", self._wire)
        if wrong is not None and previous is None:  # this client sent those bytes itself
            self._contradiction(stream, _around(snapshot.links, wrong),
                                f"it signed for an input at position {wrong} that this client did not send")
        if wrong is not None and previous is not None:
            self._accuse("inconsistent", [previous.peer_id, stream.peer_id], stream.session_id,
                         _around(snapshot.links, wrong),
                         {previous.peer_id: _attestations(_around(snapshot.previous_links, wrong))},
                         f"{previous.peer_id} signed an output at position {wrong} that {stream.peer_id} signed "
                         "for receiving differently: one of the two lies")
        if inputs.shape[2] != outputs.shape[2]:
            raise _Skip("error", f"inputs of width {inputs.shape[2]}, outputs of {outputs.shape[2]}")

    # -- re-running and judging ----------------------------------------------------------------------
    async def _judge(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Re-runs the hop's inputs on another peer; on a disagreement, a third one decides."""
        stream, start, end, result = self.snapshot.stream, self.window.start, self.window.end, self.result
        suspect = stream.hop.peer
        window_inputs = inputs[:, start:end]
        valid = valid_rows(self.session.pad_lengths, start, end)

        async def score(first: PeerRecord, first_out: torch.Tensor, second: PeerRecord, second_out: torch.Tensor,
                        name: str) -> float:
            scale = self.config.verify_tolerance_scale
            tolerance = tolerance_of(first, scale) + tolerance_of(second, scale)
            value = await asyncio.to_thread(disagreement, window_inputs, first_out, second_out, valid, tolerance)
            result.scores[name] = value
            return value

        checked = await self._rerun_somewhere([suspect], inputs)
        if self._superseded(self.window):  # the session rolled back into the window while it re-ran
            raise _Skip("superseded", "the session rolled back into the window since")
        result.checker = f"{checked.peer.peer_id}({precision_of(checked.peer)})"
        self.stats.compared += 1
        if await score(suspect, outputs, checked.peer, checked.outputs, "suspect/checker") <= 1.0:
            result.outcome = "passed"
            self.stats.passed += 1
            return
        logger.info("result check: %s and %s disagree on layers %d:%d, positions %d:%d (score %.2f); asking a "
                    "third peer", suspect.peer_id, checked.peer.peer_id, *result.layers, start, end,
                    result.scores["suspect/checker"])
        try:
            decided = await self._rerun_somewhere([suspect, checked.peer], inputs)
        except _Skip as skip:
            self._unresolved(f"no third peer to settle it: {skip}")
            return
        if self._superseded(self.window):
            raise _Skip("superseded", "the session rolled back into the window since")
        third = decided.peer
        result.third = f"{third.peer_id}({precision_of(third)})"
        suspect_vs_third = await score(suspect, outputs, third, decided.outputs, "suspect/third")
        checker_vs_third = await score(checked.peer, checked.outputs, third, decided.outputs, "checker/third")
        own = _within(self.snapshot.links, 0, end) or []
        witnesses = {checked.peer.peer_id: _attestations(checked.links), third.peer_id: _attestations(decided.links)}
        if checker_vs_third <= 1.0 < suspect_vs_third:
            self._accuse("outvoted", [suspect.peer_id], stream.session_id, own, witnesses,
                         f"its outputs disagree with those of {result.checker} and {result.third}, which agree")
        elif suspect_vs_third <= 1.0 < checker_vs_third:
            self._accuse("outvoted", [checked.peer.peer_id], checked.session_id, checked.links,
                         {suspect.peer_id: _attestations(own), third.peer_id: _attestations(decided.links)},
                         f"as the re-running peer its outputs disagree with those of {suspect.peer_id} "
                         f"({precision_of(suspect)}) and {result.third}, which agree")
        else:
            self._unresolved("the third peer agrees with both or with neither")

    async def _rerun_somewhere(self, against: list[PeerRecord], inputs: torch.Tensor) -> _Rerun:
        """Re-runs ``inputs`` on the best peer for the layers independent of ``against`` (another if it fails)."""
        layers = self.result.layers
        scale = self.config.verify_tolerance_scale
        records = await self.session.swarm.records()
        busy = {hop.peer.peer_id for hop in self.session.route}
        tried: set[str] = set()
        for _ in range(CHECKER_TRIES):
            exclude = self.session.distrusted | self.session.bans.banned() | tried
            checker = choose_checker(records, layers, against, exclude, busy, lambda r: tolerance_of(r, scale),
                                     self._rng)
            if checker is None:
                break
            tried.add(checker.peer_id)
            try:
                return await self._rerun(checker, inputs)
            except (HopFailure, BrigadeError, grpc.RpcError, _BadWitness) as error:
                logger.info("result check: re-running layers %d:%d on %s failed: %s", *layers, checker.peer_id, error)
        if not tried:
            raise _Skip("no_checker", f"no other peer serves layers {layers[0]}:{layers[1]}")
        raise _Skip("checker_failed", f"re-running on {sorted(tried)} failed")

    async def _rerun(self, record: PeerRecord, inputs: torch.Tensor) -> _Rerun:
        """One ordinary session on ``record``: open, one prefill of ``inputs`` ([B, b, H]), close."""
        session, layers = self.session, self.result.layers
        stream = await HopStream.open(
            session.swarm, Hop(record, *layers), batch_size=session.batch_size, max_length=session.max_length,
            pad_lengths=session.pad_lengths, keep_outputs=True,  # as every session of a verifying client
        )
        try:
            length = inputs.shape[1]
            hidden = await asyncio.to_thread(encode, inputs, self._wire)
            await stream.send(pb.InferenceRequest(session_id=stream.session_id, step=pb.Step(
                hidden=hidden, start_position=0, step_id=1, step_positions=length,
                rope_lengths=self.window.rope_lengths[:length])))
            pieces: list[torch.Tensor] = []
            links: list[Link] = []
            public_key = bytes.fromhex(record.public_key)
            covered = 0
            while covered < length:
                response = await stream.answer(self.config.step_timeout_s)
                if response.WhichOneof("kind") != "result":
                    continue
                try:
                    answer = await asyncio.to_thread(
                        StepAnswer.from_proto, response.result, expected_start=covered, remaining=length - covered,
                        batch=session.batch_size, width=inputs.shape[2], wire_dtype=self._wire)
                except BadAnswerError as error:
                    raise _BadWitness(str(error)) from error
                att = answer.attestation
                rope = rope_digest(self.window.rope_lengths[covered : covered + answer.positions])
                if (answer.hidden is None or att.session_id != stream.session_id
                        or (att.start_layer, att.end_layer) != layers or att.start_position != covered
                        or att.rope_sha256 != rope or att.output_sha256 != answer.hidden.digest
                        or not check_attestation(att, public_key)):
                    raise _BadWitness("its attestation does not match what it returned")
                pieces.append(answer.hidden.tensor)
                links.append(Link(att, answer.positions))
                covered += answer.positions
            self.stats.rerun_positions += length * session.batch_size
            return _Rerun(record, torch.cat(pieces, dim=1)[:, self.window.start :], links, stream.session_id)
        finally:
            stream.cancel()

    # -- verdicts ------------------------------------------------------------------------------------
    def _contradiction(self, stream: HopStream, links: list[Link], detail: str) -> None:
        self._accuse("contradiction", [stream.peer_id], stream.session_id, links, {}, detail)

    def _accuse(self, kind: str, accused: list[str], session_id: str, links: list[Link],
                witnesses: dict[str, list[pb.Attestation]], detail: str) -> None:
        """Drops ``accused`` from the session, reports it with the evidence, and ends the check."""
        result = self.result
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

    def _unresolved(self, detail: str) -> None:
        result = self.result
        result.outcome = "unresolved"
        self.stats.unresolved += 1
        logger.warning("result check: %s at layers %d:%d, positions %d:%d disagreed with %s, unresolved: %s "
                       "(scores %s)", result.peer_id, *result.layers, *result.window, result.checker, detail,
                       {key: round(value, 3) for key, value in result.scores.items()})



def _joined(pieces: list[torch.Tensor], end: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(pieces, dim=1)[:, :end].to(dtype)


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
