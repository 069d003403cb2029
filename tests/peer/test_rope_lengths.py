"""What a peer accepts as ``Step.rope_lengths``: per position, bounded, and only where the rope reads it."""

from __future__ import annotations

import asyncio

import pytest
import torch
from brigade_configs import RealConfig

from brigade.kernels.families import model_args
from brigade.peer.config import PeerConfig
from brigade.peer.sessions import Session, SessionManager
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import InvalidRequestError
from brigade.protocol.messages import OpenSession, Step
from brigade.protocol.tensors import TensorLimits, encode


def _session(name: str, pads: list[int]) -> tuple[SessionManager, Session]:
    args = model_args(RealConfig.load(name).config)
    manager = SessionManager(PeerConfig(model="x", start_layer=0, end_layer=args.num_layers, cache_tokens=4096),
                             args, torch.float32, "cpu")
    request = pb.OpenSession(session_id="session-1", start_layer=0, end_layer=args.num_layers,
                             batch_size=len(pads), max_length=100, pad_lengths=pads)
    return manager, asyncio.run(manager.open(OpenSession.from_proto(request, manager.limits)))


def _step(session: Session, manager: SessionManager, positions: int, start: int = 0,
          rope_lengths: list[int] | None = None) -> Step:
    hidden = encode(torch.zeros(session.batch_size, positions, manager.args.hidden_size))
    message = pb.Step(hidden=hidden, start_position=start, rope_lengths=rope_lengths or [])
    return Step.from_proto(message, TensorLimits(), batch=session.batch_size, width=manager.args.hidden_size,
                           max_length=session.max_length)


def test_a_step_without_rope_lengths_is_one_whole_call() -> None:
    manager, session = _session("llama-2-7b-dynamic-ntk", [3, 0])
    got = manager.rope_lengths(session, _step(session, manager, 5, start=10))
    assert got is not None and got.tolist() == [15] * 5  # its last slot + 1, from the least padded row
    manager, session = _session("llama-2-7b-dynamic-ntk", [3, 2])
    assert manager.rope_lengths(session, _step(session, manager, 5, start=10)).tolist() == [13] * 5


def test_explicit_rope_lengths_are_kept_position_by_position() -> None:
    manager, session = _session("phi-3.5-mini", [0])
    got = manager.rope_lengths(session, _step(session, manager, 4, start=4, rope_lengths=[9, 9, 7, 8]))
    assert got is not None and got.tolist() == [9, 9, 7, 8]


@pytest.mark.parametrize(("values", "message"), [
    ([5, 5], "has 2 values for 3 positions"),
    ([5, 0, 5], r"must lie in \[1, 100\]"),
    ([5, 101, 5], r"must lie in \[1, 100\]"),
], ids=["count", "zero", "past-max-length"])
def test_malformed_rope_lengths_are_refused(values: list[int], message: str) -> None:
    manager, session = _session("llama-2-7b-dynamic-ntk", [0])
    with pytest.raises(InvalidRequestError, match=message):
        _step(session, manager, 3, rope_lengths=values)


def test_a_rope_that_ignores_lengths_ignores_them() -> None:
    manager, session = _session("llama-3.1-8b", [0])  # llama3: one table at every length
    assert manager.rope_lengths(session, _step(session, manager, 3, rope_lengths=[1, 2, 3])) is None
