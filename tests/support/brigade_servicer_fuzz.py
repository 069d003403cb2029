"""Fuzzing a live peer's servicer: scenarios of interleaved streams and unary calls, and their runner.

A scenario is a list of actions on up to ``STREAMS`` Inference streams (open, step, attach, relink
or an empty message, in any order and on any stream, then half-close or cancel) mixed with
Forward, History and Info calls. Messages are mostly close to valid, so that they get past the
token and shape checks and reach the session logic: session ids come from a small pool, so
streams meet the same sessions; tokens are validly signed by the client, by another client, by the
upstream peer the client named, or by the peer itself (it may forward into its own sessions); next
hops point at the peer itself, at a closed port or at garbage. The rest come from the decoder
strategies of ``brigade_fuzz``.

``ScenarioRunner.run`` plays a scenario against a peer and returns what each call ended with; the
checks that matter (a status outside ``EXPECTED_CODES`` is a bug in the servicer, a stream that
does not end after the client half-closes is a hang) are in ``problems``. The hypothesis test and
the atheris script both use these.
"""

from __future__ import annotations

import asyncio
import string
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from brigade_fuzz import forward_requests, open_sessions, session_ids, u32, wire_tensors
from hypothesis import strategies as st

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import dial
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode
from brigade.protocol.tokens import make_token

STREAMS = 3
SESSION_POOL = ("fuzzsess-A", "fuzzsess-B", "fuzzsess-C")
HIDDEN = 64  # the tiny test models' hidden size
END_WAIT_S = 20.0  # after the client half-closes, every stream must end within this (else: a hang)
# What a peer may answer: each one a typed, expected refusal. UNKNOWN or INTERNAL mean an exception
# escaped the servicer; UNAVAILABLE that the server died; DEADLINE_EXCEEDED that nothing came back.
EXPECTED_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
})

# grpc.aio's client (grpcio 1.85) reports this instead of the server's status when one of its writes
# fails because the server already ended the stream (grpc/grpc#36066, fix proposed in #43486): a
# client-side overwrite of a status the peer did send. Accepted only on streams where a write failed.
GRPC_AIO_WRITE_RACE = "Internal error from Core"


@dataclass(frozen=True)
class Parties:
    """Who takes part: the peer under test and the identities that sign requests to it."""

    peer: Identity  # the peer's own key: it may push into its own sessions (forwarding to itself)
    address: str
    tls_cert: str
    client: Identity = field(default_factory=Identity.generate)
    other: Identity = field(default_factory=Identity.generate)  # a second client
    upstream: Identity = field(default_factory=Identity.generate)  # a peer a client names as previous hop

    def signers(self) -> list[Identity]:
        return [self.client, self.other, self.upstream, self.peer]


# ------------------------------------------------------------------------------------------ strategies
# Each field is mostly what an honest party would send (so that a message passes the token and shape
# checks and reaches the session logic) and sometimes anything at all: ``_either`` decides per field.
def _either(draw: st.DrawFn, honest: st.SearchStrategy[Any], wild: st.SearchStrategy[Any], wild_percent: int) -> Any:
    return draw(wild if draw(st.integers(0, 99)) < wild_percent else honest)


@st.composite
def _token(draw: st.DrawFn, parties: Parties, purpose: str, binding: bytes,
           signers: tuple[str, ...] = ("client", "client", "other"), wild_percent: int = 10) -> pb.Token | None:
    signer = getattr(parties, draw(st.sampled_from(signers)))
    honest = st.just(None).map(lambda _: make_token(signer, parties.peer.peer_id, purpose, binding))
    any_signer = st.sampled_from(parties.signers()).map(
        lambda other: make_token(other, parties.peer.peer_id, purpose, binding))
    wrong_binding = st.just(None).map(lambda _: make_token(signer, parties.peer.peer_id, purpose, b"other-binding"))
    elsewhere = st.just(None).map(lambda _: make_token(signer, "bpSomebodyElse", purpose, binding))
    garbage = st.builds(pb.Token, public_key=st.binary(max_size=40), audience=st.text(max_size=30),
                        issued_at=st.floats(), nonce=st.binary(max_size=20), signature=st.binary(max_size=70))
    wild = st.one_of(any_signer, wrong_binding, elsewhere, garbage, st.none())
    return _either(draw, honest, wild, wild_percent)


def _session_id(wild_percent: int = 10) -> st.SearchStrategy[str]:
    odd = st.sampled_from(["", "x", "fuzzsess-A\x00"]) | session_ids()
    return st.integers(0, 99).flatmap(lambda roll: odd if roll < wild_percent else st.sampled_from(SESSION_POOL))


def _next_hops(parties: Parties) -> st.SearchStrategy[pb.NextHop | None]:
    to_itself = st.builds(pb.NextHop, peer_id=st.just(parties.peer.peer_id), address=st.just(parties.address),
                          session_id=st.sampled_from(SESSION_POOL), tls_cert=st.just(parties.tls_cert))
    closed_port = st.builds(pb.NextHop, peer_id=st.just(parties.upstream.peer_id), address=st.just("127.0.0.1:9"),
                            session_id=st.sampled_from(SESSION_POOL), tls_cert=st.just(parties.tls_cert))
    garbage = st.builds(pb.NextHop, peer_id=st.text(max_size=30), address=st.text(max_size=40),
                        session_id=_session_id(50), tls_cert=st.text(max_size=64) | st.just("x" * 9000))
    return st.one_of(st.none(), st.none(), to_itself, to_itself, closed_port, garbage)


def _upstreams(parties: Parties) -> st.SearchStrategy[str]:
    likely = st.sampled_from(["", parties.peer.peer_id, parties.peer.peer_id, parties.upstream.peer_id])
    odd = st.just(parties.client.peer_id) | st.text(string.ascii_letters, max_size=30)
    return st.one_of(likely, likely, likely, odd)


@st.composite
def _hidden(draw: st.DrawFn, batch: int = 1, wild_percent: int = 15) -> pb.Tensor:
    """Mostly well-formed float32 hidden states of this model (of ``batch`` sequences); sometimes anything."""
    values = st.sampled_from([0.0, -2.5, 3e4, 1e38, float("nan"), float("inf")])
    honest = st.builds(lambda positions, seed: encode(_filled(batch, positions, 1.0, seed)),
                       st.integers(1, 6), st.integers(0, 1000))
    odd = st.builds(lambda rows, positions, fill, seed, dtype: encode(_filled(rows, positions, fill, seed), dtype),
                    st.integers(1, 3), st.integers(1, 6), values, st.integers(0, 1000),
                    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    wrong_width = st.builds(lambda n: encode(torch.randn(batch, n, HIDDEN + 1)), st.integers(1, 3))
    return _either(draw, honest, st.one_of(odd, wrong_width, wire_tensors()), wild_percent)


def _filled(batch: int, positions: int, fill: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(batch, positions, HIDDEN, generator=generator)
    if fill != 1.0:
        tensor[0, 0, 0] = fill
    return tensor


@st.composite
def _open(draw: st.DrawFn, parties: Parties) -> pb.InferenceRequest:
    if draw(st.integers(0, 99)) < 5:  # anything at all, signed or not
        opened = draw(open_sessions())
        token = draw(_token(parties, "open", opened.session_id.encode(), wild_percent=50))
        if token is not None:
            opened.token.CopyFrom(token)
        return pb.InferenceRequest(open=opened, session_id=draw(_session_id(50)))
    session_id = draw(_session_id())
    start, end = _either(draw, st.sampled_from([(0, 6), (0, 6), (0, 3), (3, 6), (2, 4)]),
                         st.tuples(st.integers(0, 7), st.integers(0, 7)), 5)
    batch = _either(draw, st.sampled_from([1, 1, 1, 2]), st.sampled_from([0, 65]), 5)
    opened = pb.OpenSession(
        session_id=session_id, start_layer=start, end_layer=end, batch_size=batch,
        max_length=_either(draw, st.sampled_from([16, 16, 8, 64, 512]), st.sampled_from([0, 1, 513]), 5),
        pad_lengths=_either(draw, st.just([]), st.lists(st.integers(0, 9), max_size=3), 10),
        open_timeout_s=_either(draw, st.just(0.0), st.sampled_from([0.05, -1.0, float("nan")]), 10),
        upstream_peer_id=draw(_upstreams(parties)), keep_outputs=draw(st.booleans()),
    )
    token = draw(_token(parties, "open", session_id.encode()))
    if token is not None:
        opened.token.CopyFrom(token)
    next_hop = draw(_next_hops(parties))
    if next_hop is not None:
        opened.next.CopyFrom(next_hop)
    return pb.InferenceRequest(open=opened)


@st.composite
def _step(draw: st.DrawFn) -> pb.InferenceRequest:
    batch = draw(st.sampled_from([1, 1, 1, 2]))
    start = _either(draw, st.integers(0, 8), st.integers(9, 20) | u32, 5)
    step = pb.Step(hidden=draw(_hidden(batch)), start_position=start,
                   step_id=_either(draw, st.integers(0, 9), st.integers(0, (1 << 64) - 1), 10),
                   step_positions=_either(draw, st.just(0), st.sampled_from([1, 6]) | u32, 10))
    return pb.InferenceRequest(session_id=draw(_session_id(5)), step=step)


@st.composite
def _attach(draw: st.DrawFn, parties: Parties) -> pb.InferenceRequest:
    session_id = draw(_session_id())
    attach = pb.Attach(session_id=session_id)
    token = draw(_token(parties, "attach", session_id.encode(), ("upstream", "upstream", "peer", "client")))
    if token is not None:
        attach.token.CopyFrom(token)
    return pb.InferenceRequest(attach=attach, session_id=draw(st.sampled_from(["", session_id])))


@st.composite
def _relink(draw: st.DrawFn, parties: Parties) -> pb.InferenceRequest:
    relink = pb.Relink(upstream_peer_id=draw(_upstreams(parties)))
    next_hop = draw(_next_hops(parties))
    if next_hop is not None:
        relink.next.CopyFrom(next_hop)
    return pb.InferenceRequest(session_id=draw(_session_id(5)), relink=relink)


def _empty() -> st.SearchStrategy[pb.InferenceRequest]:
    return st.builds(lambda session_id: pb.InferenceRequest(session_id=session_id), _session_id())


@st.composite
def first_messages(draw: st.DrawFn, parties: Parties) -> pb.InferenceRequest:
    """What starts a stream: mostly an open (a client), else an attach (a previous hop) or anything."""
    roll = draw(st.integers(0, 99))
    if roll < 70:
        return draw(_open(parties))
    if roll < 90:
        return draw(_attach(parties))
    return draw(st.one_of(_step(), _relink(parties), _empty()))


@st.composite
def later_messages(draw: st.DrawFn, parties: Parties, session_id: str, length: int, batch: int
                   ) -> pb.InferenceRequest:
    """What follows on a stream holding ``session_id`` (``length`` positions sent so far): mostly its next
    step, sometimes a rollback or a relink, rarely anything else."""
    roll = draw(st.integers(0, 99))
    if roll < 70:
        start = length if draw(st.integers(0, 3)) else draw(st.integers(0, length))
        step = pb.Step(hidden=draw(_hidden(batch)), start_position=start, step_id=draw(st.integers(0, 9)))
        return pb.InferenceRequest(session_id=session_id, step=step)
    if roll < 80:
        return draw(_step())
    if roll < 92:
        request = draw(_relink(parties))
        request.session_id = session_id if draw(st.integers(0, 4)) else request.session_id
        return request
    return draw(st.one_of(_open(parties), _attach(parties), _empty()))


@st.composite
def _history(draw: st.DrawFn, parties: Parties) -> pb.HistoryRequest:
    session_id = draw(_session_id())
    request = pb.HistoryRequest(session_id=session_id, start=draw(st.integers(0, 8) | u32),
                                end=draw(st.integers(0, 12) | u32))
    token = draw(_token(parties, "history", session_id.encode()))
    if token is not None:
        request.token.CopyFrom(token)
    return request


@st.composite
def _forward(draw: st.DrawFn, parties: Parties) -> pb.ForwardRequest:
    if draw(st.integers(0, 3)) == 0:
        request = draw(forward_requests())
    else:
        start, end = draw(st.sampled_from([(0, 6), (0, 3), (3, 6)]) | st.tuples(st.integers(0, 7), st.integers(0, 7)))
        request = pb.ForwardRequest(start_layer=start, end_layer=end, hidden=draw(_hidden()),
                                    pad_lengths=draw(st.just([]) | st.lists(st.integers(0, 7), max_size=3)))
    token = draw(_token(parties, "forward", b""))
    if token is not None:
        request.token.CopyFrom(token)
    return request


def _extras(parties: Parties) -> st.SearchStrategy[tuple[Any, ...]]:
    """Actions between stream messages: closing or cancelling a stream, waiting, a unary call."""
    stream = st.integers(0, STREAMS - 1)
    return st.one_of(
        st.tuples(st.just("pause"), st.sampled_from([0.0, 0.01, 0.05])),
        st.tuples(st.just("pause"), st.sampled_from([0.01, 0.05])),
        st.tuples(st.just("done"), stream),
        st.tuples(st.just("cancel"), stream),
        st.tuples(st.just("forward"), _forward(parties)),
        st.tuples(st.just("history"), _history(parties)),
        st.tuples(st.just("info"),),
    )


@st.composite
def scenarios(draw: st.DrawFn, parties: Parties, max_messages: int = 6) -> list[tuple[Any, ...]]:
    """1 to STREAMS streams of messages, interleaved in a drawn order, with extra actions in between."""
    streams = draw(st.integers(1, STREAMS))
    queues = []
    for _ in range(streams):
        first = draw(first_messages(parties))
        messages = [first]
        kind = first.WhichOneof("kind")
        session_id = first.open.session_id if kind == "open" else first.attach.session_id or first.session_id
        batch = first.open.batch_size if kind == "open" and first.open.batch_size in (1, 2) else 1
        length = 0
        for _ in range(draw(st.integers(0, max_messages - 1))):
            message = draw(later_messages(parties, session_id, length, batch))
            step = message.step
            ours = message.WhichOneof("kind") == "step" and message.session_id == session_id
            if ours and len(step.hidden.shape) == 3 and step.start_position <= length:
                length = step.start_position + max(0, step.hidden.shape[1])  # a rollback, or the next step
            messages.append(message)
        queues.append(messages)
    order = draw(st.permutations([index for index, queue in enumerate(queues) for _ in queue]))
    actions: list[tuple[Any, ...]] = []
    taken = [0] * streams
    for index in order:
        actions.append(("send", index, queues[index][taken[index]]))
        taken[index] += 1
        if draw(st.integers(0, 2)) == 0:
            actions.append(draw(_extras(parties)))
    return actions


# ------------------------------------------------------------------------------------------ running
@dataclass
class Outcome:
    """How one call ended (``code`` None: it did not end in time, a hang)."""

    what: str
    code: grpc.StatusCode | None
    details: str = ""
    responses: int = 0


class ScenarioRunner:
    """Plays scenarios against one peer over one pinned channel; use on one event loop."""

    def __init__(self, parties: Parties, end_wait_s: float = END_WAIT_S):
        self.parties = parties
        self.end_wait_s = end_wait_s
        self._channel: grpc.aio.Channel | None = None

    def stub(self) -> pb_grpc.PeerStub:
        if self._channel is None:
            self._channel = dial(self.parties.address, self.parties.tls_cert, allow_insecure=True)
        return pb_grpc.PeerStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def run(self, scenario: list[tuple[Any, ...]]) -> list[Outcome]:
        stub = self.stub()
        calls: dict[int, grpc.aio.StreamStreamCall] = {}
        counts: dict[int, int] = {}
        readers: dict[int, asyncio.Task[None]] = {}
        outcomes: list[Outcome] = []
        closed: set[int] = set()
        cancelled: set[int] = set()
        write_failed: set[int] = set()

        async def read_all(index: int, call: grpc.aio.StreamStreamCall) -> None:
            try:
                async for _ in call:
                    counts[index] += 1
            except grpc.aio.AioRpcError:
                pass
            except asyncio.CancelledError:
                if not call.cancelled():  # grpc.aio raises CancelledError from a call this client cancelled
                    raise

        for action in scenario:
            kind = action[0]
            if kind == "send":
                index, request = action[1], action[2]
                if index in closed:
                    continue
                if index not in calls:
                    calls[index] = stub.Inference()
                    counts[index] = 0
                    readers[index] = asyncio.create_task(read_all(index, calls[index]))
                try:
                    async with asyncio.timeout(self.end_wait_s):
                        await calls[index].write(request)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                    closed.add(index)  # the peer already ended this stream: fine, its status says why
                    write_failed.add(index)
            elif kind in ("done", "cancel") and index_ok(action[1], calls, closed):
                index = action[1]
                closed.add(index)
                if kind == "cancel":
                    cancelled.add(index)
                    calls[index].cancel()
                else:
                    await _done_writing(calls[index])
            elif kind == "pause":
                await asyncio.sleep(action[1])
            elif kind in ("forward", "history", "info"):
                outcomes.append(await self._unary(stub, action))
        for index, call in calls.items():
            if index not in closed:
                await _done_writing(call)
        for index, call in calls.items():
            what = f"inference stream {index}" + (" (cancelled)" if index in cancelled else "") + (
                " (a write failed)" if index in write_failed else "")
            try:
                async with asyncio.timeout(self.end_wait_s):
                    await readers[index]
                    code = grpc.StatusCode.CANCELLED if call.cancelled() else await call.code()
                details = "" if call.cancelled() else await call.details() or ""
                outcomes.append(Outcome(what, code, details, counts[index]))
            except TimeoutError:
                call.cancel()
                readers[index].cancel()
                outcomes.append(Outcome(what, None, "did not end after the client half-closed"))
        return outcomes

    async def _unary(self, stub: pb_grpc.PeerStub, action: tuple[Any, ...]) -> Outcome:
        kind = action[0]
        try:
            if kind == "forward":
                await stub.Forward(action[1], timeout=self.end_wait_s)
            elif kind == "history":
                await stub.History(action[1], timeout=self.end_wait_s)
            else:
                await stub.Info(pb.InfoRequest(), timeout=self.end_wait_s)
        except grpc.aio.AioRpcError as error:
            return Outcome(kind, error.code(), error.details() or "")
        return Outcome(kind, grpc.StatusCode.OK)


def index_ok(index: int, calls: dict[int, Any], closed: set[int]) -> bool:
    return index in calls and index not in closed


async def _done_writing(call: grpc.aio.StreamStreamCall) -> None:
    try:
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        pass


def problems(outcomes: list[Outcome]) -> list[str]:
    """Every outcome that is a bug: an unexpected status, or a call that never ended."""
    found = []
    for outcome in outcomes:
        if outcome.code is None:
            found.append(f"{outcome.what}: hang ({outcome.details})")
        elif outcome.code == grpc.StatusCode.CANCELLED and "(cancelled)" in outcome.what:
            continue  # the stream this client cancelled
        elif (outcome.code == grpc.StatusCode.INTERNAL and outcome.details == GRPC_AIO_WRITE_RACE
              and "(a write failed)" in outcome.what):
            continue  # grpc.aio's client replaced the peer's status after a late write (see GRPC_AIO_WRITE_RACE)
        elif outcome.code not in EXPECTED_CODES:
            found.append(f"{outcome.what}: unexpected {outcome.code.name}: {outcome.details}")
    return found
