"""One result check of one hop over one finished window: read back, bind to signatures, re-run, judge.

``client/verify/verifier.py`` decides which windows to check and runs these in the background; a
``HopCheck`` does the work for one hop and ends in exactly one outcome: passed, caught (a peer
dropped from the session and reported), unresolved, or skipped for a named reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import torch

from brigade.client.hops import HopStream
from brigade.client.verify.compare import (
    choose_checker,
    disagreement,
    pair_tolerance,
    precision_of,
    tolerance_of,
    valid_rows,
)
from brigade.client.verify.evidence import Link, badly_signed, first_mismatch
from brigade.client.verify.outcomes import CheckResult, Skip, Verdict, VerificationReport, VerificationStats
from brigade.client.verify.rerun import Rerunner
from brigade.client.verify.windows import HopSnapshot, Window
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import BrigadeError
from brigade.protocol.messages import history_answer
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import WIRE_DTYPES
from brigade.protocol.tokens import make_token

if TYPE_CHECKING:
    from brigade.client.standing import PeerStanding
    from brigade.client.verify.verifier import SessionView

logger = logging.getLogger(__name__)
HISTORY_MIN_BYTES_PER_S = 256 * 1024  # the slowest uplink a read-back is given time for (about 2 Mbit/s)



class HopCheck:
    """The check of ``snapshot``'s hop over ``window``; ``run`` it once."""

    def __init__(self, view: SessionView, standing: PeerStanding, stats: VerificationStats, rng: random.Random,
                 window: Window, snapshot: HopSnapshot, superseded: Callable[[Window], bool]):
        self.view = view  # what the check needs of its session, and nothing it could write into
        self.standing = standing  # where a verdict goes
        self.config = view.config
        self._rerunner = Rerunner(view, standing, (snapshot.stream.hop.start, snapshot.stream.hop.end), window, rng,
                                  stats)
        self.stats = stats
        self.window = window
        self.snapshot = snapshot
        self._rng = rng
        self._superseded = superseded
        self._wire = WIRE_DTYPES[self.config.wire_dtype]
        hop = snapshot.stream.hop
        self.result = CheckResult(hop.peer.peer_id, precision_of(hop.peer), (hop.start, hop.end),
                                  (window.start, window.end))
        self._handover: int | None = None  # a position whose handover the two neighbours signed differently
        self._deadline: asyncio.Timeout | None = None  # the whole check's; a big read-back extends it

    async def run(self) -> CheckResult:
        """Never raises (but for cancellation): every failure is a counted skip."""
        began = time.monotonic()
        result = self.result
        try:
            async with asyncio.timeout(self.config.verify_timeout_s) as self._deadline:
                if not await self._anyone_else():
                    raise Skip("no_checker", "no other peer serves the layers")
                inputs, outputs = await self._read_back()
                await self._judge(inputs, outputs)
        except Verdict:
            pass
        except Skip as skip:
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
        records = await self.view.swarm.records()
        exclude = self.standing.excluded()
        other = choose_checker(records, (hop.start, hop.end), [hop.peer], exclude, (), tolerance_of, self._rng)
        return other is not None

    # -- reading back --------------------------------------------------------------------------------
    async def _read_back(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The hop's inputs [B, b, H] and window outputs [B, b - a, H], each bound to what peers signed."""
        snapshot, start, end = self.snapshot, self.window.start, self.window.end
        stream = snapshot.stream
        if stream.peer_id in self.standing.distrusted:
            raise Skip("already_dropped")
        if snapshot.unusable:
            raise Skip(snapshot.unusable, "its inputs came partly from a peer a failover replaced since")
        outputs_links = _within(snapshot.links, start, end)
        if outputs_links is None or (snapshot.logged_inputs is None and not snapshot.previous_links):
            raise Skip("unattested", "some positions have no attestation (a partial rollback)")
        if snapshot.logged_inputs is not None:
            inputs = await asyncio.to_thread(_joined, snapshot.logged_inputs, end, self._wire)
        else:
            assert snapshot.previous is not None
            inputs = await self._history(snapshot.previous, 0, end)
        first = outputs_links[0].start  # the attestation holding ``start`` may begin before it (a prefill)
        outputs = await self._history(stream, first, end)
        if self._superseded(self.window):
            raise Skip("superseded", "the session rolled back into the window since")
        await self._bind(inputs, outputs, outputs_links)
        return inputs, outputs[:, start - first :]

    async def _history(self, stream: HopStream, start: int, end: int) -> torch.Tensor:
        """A hop's kept outputs for ``[start, end)``, read in pieces under the message cap.

        A peer that refuses or stalls the read-back of a hop still on the session's route fails the
        check: were it skipped, refusing would be a free way out of every check. It gets one retry
        first (a transient fault), a stall is judged against a time that grows with the bytes asked
        for (a slow uplink is not a stall), and a peer that stopped answering at all (its ``Info``
        fails too) has crashed or left rather than refused: the step loop replaces it, nobody is
        accused. Only a hop the session has left since (replaced, or draining) is excused outright.
        """
        swarm = self.view.swarm
        pieces: list[torch.Tensor] = []
        position, most, retried = start, self.view.message_positions(), False
        while position < end:
            stop = min(end, position + most)
            request = pb.HistoryRequest(
                session_id=stream.session_id, start=position, end=stop,
                token=make_token(swarm.identity, stream.peer_id, "history", stream.session_id.encode()))
            timeout_s = self._history_timeout_s(stop - position)
            try:
                response = await swarm.stub(stream.hop.peer).History(request, timeout=timeout_s)
                piece = await asyncio.to_thread(history_answer, response, batch=self.view.batch_size,
                                                width=swarm.hidden_size, positions=stop - position)
            except grpc.aio.AioRpcError as error:  # refused, stalled, or the peer left
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and most > 1:
                    most = max(1, most // 8)  # that peer's own cap is lower: smaller pieces, then judge
                    continue
                if not self._still_used(stream):
                    raise Skip("unavailable", f"History of {stream.peer_id} failed: {error.code().name}") from error
                if not retried:
                    retried = True
                    await asyncio.sleep(0.2)
                    continue
                if not await self._answers_info(stream):
                    raise Skip("unavailable", f"{stream.peer_id} answers nothing now (crashed or gone)") from error
                self._accuse("refused", [stream.peer_id], stream.session_id, [], {},
                             f"it refused or stalled the read-back of its outputs ({error.code().name})")
            except BrigadeError as error:  # undecodable, or not the positions asked for
                self._contradiction(stream, [], f"its History answer is not what was asked: {error}")
            pieces.append(piece)
            position, retried = stop, False
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _history_timeout_s(self, positions: int) -> float:
        """Time for one read-back piece: a share of the check, or longer for many bytes.

        The share bounds a stall; the byte allowance (``HISTORY_MIN_BYTES_PER_S``) keeps an honest
        peer on a slow uplink from counting as stalling. The check's own deadline grows to match.
        """
        nbytes = positions * self.view.batch_size * self.view.swarm.hidden_size * self._wire.itemsize
        share = max(1.0, min(self.config.step_timeout_s, self.config.verify_timeout_s / 4))
        timeout_s = max(share, nbytes / HISTORY_MIN_BYTES_PER_S)
        if self._deadline is not None and (when := self._deadline.when()) is not None:
            loop_now = asyncio.get_running_loop().time()
            self._deadline.reschedule(max(when, loop_now + timeout_s + 1.0))
        return timeout_s

    async def _answers_info(self, stream: HopStream) -> bool:
        """Whether the peer behind ``stream`` still answers at all (a refusal, not a crash)."""
        try:
            await self.view.swarm.stub(stream.hop.peer).Info(pb.InfoRequest(), timeout=5.0)
        except grpc.aio.AioRpcError:
            return False
        return True

    def _still_used(self, stream: HopStream) -> bool:
        """Whether ``stream`` is still a hop of the session and its peer has not said it is leaving."""
        live = any(hop is stream for hop in self.view.hops)
        return live and not stream.leaving and stream.peer_id not in self.standing.leaving

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
            # Two signatures disagree about one handover: either may lie, and one free identity must not
            # evict an honest neighbour by signing a wrong hash. Nobody is accused for it; the re-run
            # (``_judge``) from what the previous peer signed decides whether this hop computed wrongly.
            self._handover = wrong
            logger.info("result check: %s signed an output at position %d that %s signed for receiving "
                        "differently; re-running before accusing anyone", previous.peer_id, wrong, stream.peer_id)
        if inputs.shape[2] != outputs.shape[2]:
            raise Skip("error", f"inputs of width {inputs.shape[2]}, outputs of {outputs.shape[2]}")

    # -- re-running and judging ----------------------------------------------------------------------
    async def _judge(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Re-runs the hop's inputs on another peer; on a disagreement, a third one decides."""
        stream, start, end, result = self.snapshot.stream, self.window.start, self.window.end, self.result
        suspect = stream.hop.peer
        window_inputs = inputs[:, start:end]
        valid = valid_rows(self.view.pad_lengths, start, end)

        async def score(first: PeerRecord, first_out: torch.Tensor, second: PeerRecord, second_out: torch.Tensor,
                        name: str) -> float:
            tolerance = pair_tolerance(first, second, self.config.verify_tolerance_scale)
            value = await asyncio.to_thread(disagreement, window_inputs, first_out, second_out, valid, tolerance)
            result.scores[name] = value
            return value

        checked = await self._rerunner.somewhere([suspect], inputs)
        if self._superseded(self.window):  # the session rolled back into the window while it re-ran
            raise Skip("superseded", "the session rolled back into the window since")
        result.checker = f"{checked.peer.peer_id}({precision_of(checked.peer)})"
        self.stats.compared += 1
        if await score(suspect, outputs, checked.peer, checked.outputs, "suspect/checker") <= 1.0:
            if self._handover is not None:  # it computed right from what its upstream signed: nobody shown wrong
                self._unresolved(f"the handover at position {self._handover} was signed differently by the two "
                                 "neighbours, but this hop's outputs are right for what its upstream signed")
                return
            result.outcome = "passed"
            self.stats.passed += 1
            return
        logger.info("result check: %s and %s disagree on layers %d:%d, positions %d:%d (score %.2f); asking a "
                    "third peer", suspect.peer_id, checked.peer.peer_id, *result.layers, start, end,
                    result.scores["suspect/checker"])
        try:
            decided = await self._rerunner.somewhere([suspect, checked.peer], inputs)
        except Skip as skip:
            self._unresolved(f"no third peer to settle it: {skip}")
            return
        if self._superseded(self.window):
            raise Skip("superseded", "the session rolled back into the window since")
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
        self.standing.distrust(report)
        result.outcome = "caught"
        result.accused = list(accused)
        self.stats.caught += 1
        logger.warning("result check (%s): %s at layers %d:%d, positions %d:%d: %s; dropped from this session "
                       "(scores %s; %d attestations kept as evidence)", kind, ", ".join(accused), *result.layers,
                       *result.window, detail, {key: round(value, 3) for key, value in result.scores.items()},
                       len(report.attestations))
        raise Verdict

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
