"""How a session repairs its route: the recovery half of ``InferenceSession``.

When a hop fails (``HopFailure``: connection lost, deadline passed, any error status, a wrong
answer), says it is leaving, or is caught by a result check (``PeerStanding.distrusted``), the
session replaces exactly that hop's layers with a new chain of peers, rebuilt by replaying the
positions the old one held: the client's own log of what it sent, or the previous peer's kept
outputs (``History``); a previous peer that cannot give them back is rebuilt too. Pairs of peers
that cannot reach each other are unlinked (the client carries their activations). Every wait here
is bounded by the step's retry budget.

A mixin: ``InferenceSession`` (``client/session.py``) holds the state (hops, events, standing) and
runs the one step loop that calls these.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from brigade.client.arrival import check_on_arrival
from brigade.client.budget import Budget
from brigade.client.chunks import replay_pieces
from brigade.client.hops import HopFailure, HopStream, new_session_id
from brigade.client.verify.evidence import first_mismatch
from brigade.client.verify.outcomes import VerificationReport
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import rope_digest
from brigade.protocol.errors import MissingLayersError
from brigade.protocol.messages import Step
from brigade.protocol.tensors import encode
from brigade.routing.route import Hop

if TYPE_CHECKING:
    from collections.abc import Callable

# Replay messages one hop may have unanswered at once: enough to keep its compute thread busy, few
# enough that a long batch-invariant replay (one message per decode step) is not all buffered at once.
REPLAY_WINDOW = 16

logger = logging.getLogger(__name__)


class ForwardBroken(Exception):
    """Hop ``index`` could not reach the next hop: that pair goes client-driven and the step restarts."""

    def __init__(self, index: int, reason: str, suspect: Hop | None = None):
        super().__init__(reason)
        self.index = index
        # The next hop, when what went wrong was its failure on what it was pushed: it is relinked with a
        # decode step's deadline, and a hop that cannot even acknowledge that has failed by itself.
        self.suspect = suspect
        self.detected_after_s = 0.0


class UnverifiedHistory(Exception):
    """The previous hop's kept attestations do not cover the History read: it cannot be trusted or blamed."""

    def __init__(self, hop: Hop):
        super().__init__(f"peer {hop.peer.peer_id}: its attestations do not cover the positions read back")
        self.hop = hop


@dataclass
class FailoverEvent:
    """One recovery, for logs, tests and benchmarks."""

    kind: str  # "failure" (peer banned), "migration" (peer leaving, no ban), "unlink" (pair went client-driven)
    # or "distrust" (a result check caught the peer: it and every later hop are rebuilt without it)
    peer_id: str
    layers: tuple[int, int]
    reason: str
    detected_after_s: float  # from sending the failed request to noticing; 0 for migrations
    recovery_s: float = 0.0  # re-routing, opening and replaying
    replayed_positions: int = 0
    new_route: list[str] = field(default_factory=list)


class RouteRepair:
    """Replacing, unlinking and rebuilding a session's hops (mixed into ``InferenceSession``).

    It reads the session's state below and uses four of its methods: ``rope_lengths_for``,
    ``message_positions``, ``_result`` (the next answer of an attempt) and ``_answer`` (that answer, checked).
    """

    hops: list[HopStream]
    events: list[FailoverEvent]
    standing: Any
    swarm: Any
    config: Any
    batch_size: int
    max_length: int
    pad_lengths: list[int]
    position: int
    rope_lengths: list[int]
    unforwardable: set[tuple[str, str]]
    _step_id: int
    _wire_dtype: torch.dtype

    def _find(self, hop: Hop) -> int | None:
        """Where ``hop`` is on the route now (None: an earlier recovery already replaced it)."""
        for index, stream in enumerate(self.hops):
            if stream.hop == hop:
                return index
        return None

    def _note_failure(self, failure: HopFailure, detected_after_s: float) -> FailoverEvent:
        if failure.detected_after_s is not None:
            detected_after_s = failure.detected_after_s
        peer_id = failure.hop.peer.peer_id
        if failure.lied:  # signed evidence of a lie: no session of this model uses it again
            self.standing.distrust(VerificationReport(
                kind="misattested", accused=[peer_id], layers=(failure.hop.start, failure.hop.end),
                window=(self.position, self.position), session_id="", detail=failure.reason))
            logger.warning("%s; distrusted, rerouting layers %d:%d", failure, failure.hop.start, failure.hop.end)
            return FailoverEvent("distrust", peer_id, (failure.hop.start, failure.hop.end), failure.reason,
                                 detected_after_s)
        if failure.leaving:
            self.standing.mark_leaving(peer_id)
            kind = "migration"
        else:
            duration = self.standing.ban(peer_id)
            kind = "failure"
            logger.warning("%s; banned for %.0f s, rerouting layers %d:%d", failure, duration,
                           failure.hop.start, failure.hop.end)
        return FailoverEvent(kind, peer_id, (failure.hop.start, failure.hop.end), failure.reason, detected_after_s)

    async def _migrate_leaving(self, start: int, budget: Budget) -> None:
        index = 0
        while index < len(self.hops):
            stream = self.hops[index]
            if stream.leaving:
                event = FailoverEvent("migration", stream.peer_id, (stream.hop.start, stream.hop.end),
                                      "peer leaving", 0.0)
                await self._replace(index, start, budget, event)
            index += 1

    async def _leave_distrusted(self, start: int, budget: Budget) -> None:
        """Rebuilds the route from the first hop a result check caught cheating to the end: every later
        hop's cache was computed from its wrong outputs."""
        index = next((i for i, stream in enumerate(self.hops) if stream.peer_id in self.standing.distrusted), None)
        if index is not None:
            stream = self.hops[index]
            event = FailoverEvent("distrust", stream.peer_id, (stream.hop.start, self.hops[-1].hop.end),
                                  "a result check caught it returning wrong results", 0.0)
            await self._replace(len(self.hops) - 1, start, budget, event, first=index)

    async def _replay_input(self, index: int, end: int) -> torch.Tensor | None:
        """Hop ``index``'s inputs for positions [0, end): this client's log, or the previous peer's outputs."""
        if end == 0:
            return None
        stream = self.hops[index]
        if stream.inputs.complete and stream.inputs.length >= end:
            return stream.inputs.read(end)
        if index == 0:
            raise RuntimeError("the first hop's inputs are always kept by the client")
        previous = self.hops[index - 1]
        history = await previous.history(end, self.config.step_timeout_s, self.message_positions())
        await asyncio.to_thread(self._check_history, previous, history, end)
        return history

    def _check_history(self, previous: HopStream, history: torch.Tensor, end: int) -> None:
        """Binds a failover's History read (positions [0, end)) to what ``previous`` signed for them.

        A rebuilt hop's cache is computed from these bytes, so right-shaped garbage would give the
        user wrong tokens silently. Bytes other than the peer's own signed outputs are a signed lie
        (``HopFailure.lied``: distrusted, and rebuilt from this client's own inputs too); positions
        its kept attestations no longer cover (a partial rollback, a long session past the kept
        ones) cannot be checked, so that hop is rebuilt as well, without blaming it.
        """
        links = previous.signed_outputs(end)
        if links is None:
            raise UnverifiedHistory(previous.hop)
        wrong = first_mismatch(history, 0, links, "output_sha256", self._wire_dtype)
        if wrong is not None:
            raise HopFailure(previous.hop, f"its History from position {wrong} is not the output it signed for",
                             lied=True)

    async def _replace(self, index: int, start: int, budget: Budget, event: FailoverEvent,
                       first: int | None = None) -> None:
        """Swaps hops ``first..index`` (default: just ``index``, and earlier hops whose outputs were lost
        with it) for a new chain."""
        began = time.monotonic()
        if event.kind == "migration":
            self.standing.mark_leaving(self.hops[index].peer_id)
        first = index if first is None else first
        while True:
            try:
                replay = await self._replay_input(first, start)
                break
            except HopFailure as failure:  # the previous peer is gone too (or lied): rebuild it as well
                budget.spend(failure)
                self.events.append(self._note_failure(failure, 0.0))
                first -= 1
            except UnverifiedHistory:  # its outputs cannot be checked: rebuild it too, from earlier inputs
                first -= 1
        layers = (self.hops[first].hop.start, self.hops[index].hop.end)
        replacement = await self._build_with_retries(*layers, replay, budget)
        old = self.hops[first : index + 1]
        self.hops[first : index + 1] = replacement
        for stream in old:
            stream.cancel()
        await self._link(self.hops, (first - 1, first + len(replacement) - 1))  # the pairs around it
        event.recovery_s = time.monotonic() - began
        event.replayed_positions = 0 if replay is None else replay.shape[1]
        event.new_route = [f"{s.peer_id}[{s.hop.start}:{s.hop.end}]" for s in replacement]
        self.events.append(event)
        logger.info("%s of %s at layers %d:%d handled in %.3f s (replayed %d positions) via %s", event.kind,
                    event.peer_id, *event.layers, event.recovery_s, event.replayed_positions, event.new_route)

    async def _unlink(self, index: int, reason: str, receiver_timeout_s: float | None = None) -> None:
        """Hop ``index`` could not reach hop ``index + 1``: carry that pair's activations from now on."""
        sender, receiver = self.hops[index], self.hops[index + 1]
        self.unforwardable.add((sender.peer_id, receiver.peer_id))
        sender.session_next = None
        receiver.session_upstream = ""
        receiver.receives_push = False
        timeout = self.config.open_timeout_s
        await _all(sender.relink(None, sender.session_upstream, timeout),
                   receiver.relink(receiver.session_next, "", receiver_timeout_s or timeout))
        self.events.append(FailoverEvent("unlink", sender.peer_id, (sender.hop.start, sender.hop.end), reason, 0.0))

    def _can_forward(self, sender: Any, receiver: Any) -> bool:
        """Whether peer ``sender`` may push into ``receiver`` (records): not a pair that failed to, and not
        a receiver that needs tickets from a sender too old to pass them on (it would refuse every push)."""
        return ((sender.peer_id, receiver.peer_id) not in self.unforwardable
                and (sender.push_tickets or not receiver.push_tickets))

    async def _link(self, streams: list[HopStream], pairs: Iterable[int]) -> None:
        """Links each pair ``(streams[i], streams[i + 1])`` for i in ``pairs`` that can forward.

        A no-op when forwarding is off. Each touched hop gets one Relink carrying both its links,
        and the session waits for every acknowledgement, so the next step already flows the new way.
        """
        if not self.config.forwarding:
            return
        touched: dict[int, HopStream] = {}
        for index in pairs:
            if not 0 <= index < len(streams) - 1:
                continue
            sender, receiver = streams[index], streams[index + 1]
            if not self._can_forward(sender.hop.peer, receiver.hop.peer):
                continue
            sender.session_next = receiver.next_hop()
            receiver.session_upstream = sender.peer_id
            receiver.receives_push = True
            receiver.inputs.clear()
            receiver.inputs.complete = False  # from now on its inputs are the previous peer's kept outputs
            touched[id(sender)], touched[id(receiver)] = sender, receiver
        timeout = self.config.open_timeout_s
        await _all(*(stream.relink(stream.session_next, stream.session_upstream, timeout)
                     for stream in touched.values()))

    async def _build_with_retries(
        self, start: int, end: int, history: torch.Tensor | None, budget: Budget
    ) -> list[HopStream]:
        fresh = False
        # Its waits for coverage are bounded from here; the budget's own clock starts only at a failure
        # (a migration builds a route with nothing failed, and the step may still meet a hung hop).
        ends_at = time.monotonic() + budget.remaining_s()
        while True:
            try:
                wait_s = max(0.0, min(self.config.route_wait_s, ends_at - time.monotonic()))
                return await self._build_chain(start, end, history, self.standing.excluded, fresh, wait_s)
            except HopFailure as failure:
                budget.spend(failure)
                self.events.append(self._note_failure(failure, 0.0))
            except MissingLayersError:
                # route() already waited for coverage; give up with this error, which names the layers.
                left = min(ends_at, time.monotonic() + budget.remaining_s()) - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(0.5, left))
            fresh = True  # something changed: read the DHT again rather than a cached view

    async def _build_chain(
        self, start: int, end: int, history: torch.Tensor | None, exclude: Callable[[], set[str]], fresh: bool,
        wait_s: float,
    ) -> list[HopStream]:
        """Opens a chain over [start, end) and replays ``history`` through it (client-driven), unlinked."""
        needed = self.batch_size * self.max_length
        forwarding = self.config.forwarding
        replayed = 0 if history is None else history.shape[0] * history.shape[1]
        route = await self.swarm.route(
            start, end, exclude=exclude, fresh=fresh, wait_s=wait_s, cache_tokens=needed, batch_size=self.batch_size,
            prefill_tokens=replayed, decode_tokens=self.max_length - self.position, ping_unknown=history is None,
            forwarding=forwarding,
        )
        session_ids = [new_session_id() for _ in route]
        link_now = forwarding and history is None  # a fresh chain can be linked at open; a replayed one after
        opens = []
        for index, hop in enumerate(route):
            next_hop = None
            if link_now and index + 1 < len(route):
                following = route[index + 1]
                if self._can_forward(hop.peer, following.peer):
                    next_hop = pb.NextHop(peer_id=following.peer.peer_id, address=following.peer.address,
                                          session_id=session_ids[index + 1], tls_cert=following.peer.tls_cert,
                                          relay_peer_id=following.peer.relay_peer_id)
            previous = route[index - 1].peer.peer_id if link_now and index > 0 else ""
            if previous and not self._can_forward(route[index - 1].peer, hop.peer):
                previous = ""
            opens.append(HopStream.open(
                self.swarm, hop, batch_size=self.batch_size, max_length=self.max_length,
                pad_lengths=self.pad_lengths, session_id=session_ids[index], next_hop=next_hop,
                upstream_peer_id=previous, keep_outputs=forwarding or self.config.verify_rate > 0,
            ))
        results = await asyncio.gather(*opens, return_exceptions=True)
        streams = [result for result in results if isinstance(result, HopStream)]
        failure = next((result for result in results if isinstance(result, BaseException)), None)
        if failure is not None:
            for stream in streams:
                stream.cancel()
            raise failure
        for stream in streams:
            self.standing.forgive(stream.peer_id)  # it answered: its record of failures starts over
        for index, stream in enumerate(streams):
            stream.session_next = streams[index + 1].next_hop() if stream.forwards else None
            stream.session_upstream = streams[index - 1].peer_id if stream.receives_push else ""
        try:
            if history is not None:
                replay = history
                for stream in streams:
                    replay = await self._replay_through(stream, replay)
                await self._link(streams, range(len(streams) - 1))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    async def _replay_through(self, stream: HopStream, replay: torch.Tensor) -> torch.Tensor:
        """Rebuilds one new hop's cache from ``replay`` (positions [0, n)) and returns its outputs.

        One step in messages under the cap, cut where the original steps began (``client/chunks.py``),
        so that a replay of any length is accepted and a prefill's cache is rebuilt as it was computed.
        At most ``REPLAY_WINDOW`` messages are unanswered at a time: a batch-invariant replay sends one
        message per original decode step, thousands on a long session, and what is sent ahead waits in
        gRPC buffers and the peer's stream (which takes one step of a session at a time).
        """
        self._step_id += 1
        step_id = self._step_id
        length = replay.shape[1]
        pieces_to_send = deque(replay_pieces(self.hops[0].inputs.starts() if self.hops else [0], length,
                                             self.message_positions(), merge_decode=not self.config.batch_invariant))
        unanswered: deque[int] = deque()  # end positions of the messages sent and not yet fully answered
        pieces, covered = [], 0
        while covered < length:
            while pieces_to_send and len(unanswered) < REPLAY_WINDOW:
                start, end = pieces_to_send.popleft()
                stream.inputs.append(start, replay[:, start:end])
                stream.ask(end - start)
                await stream.send(pb.InferenceRequest(session_id=stream.session_id, step=Step.proto(
                    encode(replay[:, start:end], self._wire_dtype), start, step_id, length,
                    self.rope_lengths_for(start, end))))
                unanswered.append(end)
            sent_end = unanswered[-1] if unanswered else length
            result = self._answer(stream, await self._result(stream, step_id, self.config.step_timeout_s), covered,
                                  sent_end - covered)  # never positions it was not sent yet
            if result.hidden is None:
                raise HopFailure(stream.hop, "a replay answered without its outputs")
            check_on_arrival(stream, result)
            if self.swarm.rope_by_length and result.attestation.rope_sha256 != rope_digest(
                    self.rope_lengths[result.start_position : result.start_position + result.positions]):
                raise HopFailure(stream.hop, "replayed with other rope lengths than it was sent")
            stream.keep_attestation(result.attestation, result.positions)
            pieces.append(result.hidden.tensor)
            covered += result.positions
            while unanswered and unanswered[0] <= covered:
                unanswered.popleft()
        return torch.cat(pieces, dim=1)


async def _all(*coroutines: Any) -> None:
    """Awaits every coroutine; then raises the first failure, if any (none is left running or unretrieved)."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
