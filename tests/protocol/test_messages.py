"""Typed wire messages refuse malformed input at ``from_proto``, with the fault on the right side.

A peer checking a client's request raises the request's own errors (every peer would refuse it);
a client checking a peer's answer raises ``BadAnswerError`` (the peer's fault: route around it).
"""

from __future__ import annotations

import pytest
import torch

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import (
    BadAnswerError,
    InvalidRequestError,
    InvalidTensorError,
    SessionLengthError,
)
from brigade.protocol.messages import (
    Hidden,
    OpenSession,
    SessionLimits,
    Step,
    StepAnswer,
    history_answer,
)
from brigade.protocol.tensors import TensorLimits, encode

LIMITS = SessionLimits(start_layer=2, end_layer=6, max_batch_size=4, max_length=64, peer_max_length=64,
                       model_positions=512)
WIDTH = 8


def _open(**fields: object) -> pb.OpenSession:
    values = dict(session_id="session-0001", start_layer=2, end_layer=4, batch_size=2, max_length=32,
                  pad_lengths=[0, 3])
    values.update(fields)
    return pb.OpenSession(**values)


def test_a_well_formed_open_round_trips() -> None:
    message = _open(next=pb.NextHop(peer_id="p", address="127.0.0.1:5", session_id="session-0002"))
    opened = OpenSession.from_proto(message, LIMITS)
    assert opened.pad_lengths == (0, 3) and opened.next is not None and opened.next.address == "127.0.0.1:5"
    assert OpenSession.from_proto(opened.to_proto(), LIMITS) == opened
    with pytest.raises(Exception, match="frozen"):
        opened.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"session_id": "short"}, InvalidRequestError, "session_id"),
    ({"start_layer": 0}, InvalidRequestError, "not inside this peer's span 2:6"),
    ({"end_layer": 7}, InvalidRequestError, "not inside"),
    ({"batch_size": 5, "pad_lengths": []}, InvalidRequestError, "batch_size"),
    ({"max_length": 0}, InvalidRequestError, "at least 1"),
    ({"max_length": 65}, SessionLengthError, "--max-session-length"),
    ({"pad_lengths": [0]}, InvalidRequestError, "pad_lengths"),
    ({"pad_lengths": [0, 32]}, InvalidRequestError, "pad_lengths"),
    ({"next": pb.NextHop(address="", session_id="session-0002")}, InvalidRequestError, "next hop"),
    ({"next": pb.NextHop(address="x" * 300, session_id="session-0002")}, InvalidRequestError, "too long"),
    ({"push_key": b"k" * 31}, InvalidRequestError, "push_key"),
], ids=["id", "below-span", "past-span", "batch", "zero-length", "too-long", "pads-count", "pad-too-long",
        "next-no-address", "next-long-address", "push-key"])
def test_malformed_opens_are_the_requests_fault(fields: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        OpenSession.from_proto(_open(**fields), LIMITS)
    assert caught.value.request_fault


def _step(hidden: torch.Tensor, start: int = 0, rope: list[int] | None = None) -> Step:
    message = pb.Step(hidden=encode(hidden), start_position=start, step_id=1, rope_lengths=rope or [])
    return Step.from_proto(message, TensorLimits(), batch=2, width=WIDTH, max_length=32)


@pytest.mark.parametrize(("hidden", "start", "rope", "error", "match"), [
    (torch.zeros(2, 3), 0, None, InvalidTensorError, "must be"),
    (torch.zeros(2, 0, WIDTH), 0, None, InvalidTensorError, "positions>0"),
    (torch.zeros(2, 3, WIDTH + 1), 0, None, InvalidTensorError, "hidden size"),
    (torch.zeros(3, 3, WIDTH), 0, None, InvalidTensorError, "batch of 3"),
    (torch.full((2, 3, WIDTH), float("nan")), 0, None, InvalidTensorError, "NaN"),
    (torch.zeros(2, 3, WIDTH), 30, None, SessionLengthError, "past the session's max_length"),
    (torch.zeros(2, 3, WIDTH), 0, [1, 2], InvalidRequestError, "2 values for 3"),
    (torch.zeros(2, 3, WIDTH), 0, [1, 2, 33], InvalidRequestError, "must lie in"),
], ids=["rank", "empty", "width", "batch", "nan", "too-far", "rope-count", "rope-value"])
def test_malformed_steps_are_the_requests_fault(hidden, start, rope, error, match) -> None:
    with pytest.raises(error, match=match):
        _step(hidden, start, rope)


def test_a_step_bounds_the_tickets_it_passes_on() -> None:
    tickets = [pb.PushTicket(session_id=f"session-{index:04d}", step_start=0, tag=bytes(32)) for index in range(65)]
    message = pb.Step(hidden=encode(torch.zeros(2, 3, WIDTH)), start_position=0, step_id=1, tickets=tickets[:64])
    assert len(Step.from_proto(message, TensorLimits(), batch=2, width=WIDTH, max_length=32).tickets) == 64
    for bad in (tickets, [pb.PushTicket(session_id="s" * 65, tag=bytes(32))], [pb.PushTicket(tag=bytes(33))]):
        message = pb.Step(hidden=encode(torch.zeros(2, 3, WIDTH)), start_position=0, step_id=1, tickets=bad)
        with pytest.raises(InvalidRequestError, match="tickets"):
            Step.from_proto(message, TensorLimits(), batch=2, width=WIDTH, max_length=32)


def test_a_step_keeps_the_digest_of_its_wire_bytes() -> None:
    hidden = torch.randn(2, 3, WIDTH)
    step = _step(hidden)
    _, wire = Hidden.of(hidden)
    assert step.hidden.digest == Hidden.of(hidden)[0].digest and torch.equal(step.hidden.tensor, hidden)
    assert wire.shape == [2, 3, WIDTH]


def _answer(result: pb.StepResult, expected_start: int = 4, remaining: int = 3) -> StepAnswer:
    return StepAnswer.from_proto(result, expected_start=expected_start, remaining=remaining, batch=2, width=WIDTH,
                                 wire_dtype=torch.float32)


def test_a_good_answer_is_typed() -> None:
    answer = _answer(pb.StepResult(start_position=4, positions=2, length=6, hidden=encode(torch.zeros(2, 2, WIDTH))))
    assert answer.hidden is not None and answer.hidden.tensor.shape == (2, 2, WIDTH) and answer.length == 6
    assert _answer(pb.StepResult(start_position=4, positions=3, forwarded=True)).hidden is None


@pytest.mark.parametrize(("result", "match"), [
    (pb.StepResult(start_position=5, positions=2), "expected 4"),
    (pb.StepResult(start_position=4, positions=0), "answered positions"),
    (pb.StepResult(start_position=4, positions=4), "at most 3"),
    (pb.StepResult(start_position=4, positions=2, hidden=encode(torch.zeros(2, 3, WIDTH))), "for 2 positions"),
    (pb.StepResult(start_position=4, positions=2, hidden=encode(torch.zeros(2, 2, WIDTH + 2))), "hidden size"),
    (pb.StepResult(start_position=4, positions=2, hidden=encode(torch.zeros(1, 2, WIDTH))), "batch of 1"),
    (pb.StepResult(start_position=4, positions=2, hidden=encode(torch.zeros(2, 2, WIDTH), torch.bfloat16)),
     "bfloat16"),
], ids=["start", "empty", "too-many", "shape", "width", "batch", "dtype"])
def test_a_wrong_answer_is_the_peers_fault(result: pb.StepResult, match: str) -> None:
    with pytest.raises(BadAnswerError, match=match) as caught:
        _answer(result)
    assert not caught.value.request_fault


def test_a_short_history_is_the_peers_fault() -> None:
    good = pb.HistoryResponse(hidden=encode(torch.zeros(2, 5, WIDTH)))
    assert history_answer(good, batch=2, width=WIDTH, positions=5).shape == (2, 5, WIDTH)
    with pytest.raises(BadAnswerError, match="3 positions, 5 were asked"):
        history_answer(pb.HistoryResponse(hidden=encode(torch.zeros(2, 3, WIDTH))), batch=2, width=WIDTH,
                       positions=5)
    with pytest.raises(BadAnswerError):
        history_answer(pb.HistoryResponse(), batch=2, width=WIDTH, positions=5)
