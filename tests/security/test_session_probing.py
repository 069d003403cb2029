"""Session ids cannot be probed, and a blocked client cannot push steps in as a previous hop.

- ``History`` and ``attach`` check the caller's token before they look the session up, and a session
  the caller may not read answers exactly as one that does not exist: a stranger learns nothing
  about which session ids are open.
- A push stream (``attach``) is the previous hop's, but its sender is also held to the peer's
  ``allowed_clients``/``blocked_clients``: a client named as a session's upstream by its (colluding)
  opener is still refused when the peer blocks it.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest
import torch
from brigade_peer_client import CLIENT, open_session, peer_stub
from brigade_security import SecuritySwarm

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode
from brigade.protocol.tokens import make_token

pytestmark = pytest.mark.timeout(120)

STRANGER = Identity.generate()


class _Open:
    """A session held open on ``info`` by CLIENT for the length of a test."""

    def __init__(self, info: dict[str, object], session_id: str, **fields: object):
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue()
        self.channel, stub = peer_stub(info)
        self._responses = stub.Inference(iter(self._requests.get, None), timeout=60)
        self._requests.put(open_session(info, session_id, start_layer=0, end_layer=6, batch_size=1,
                                        max_length=64, keep_outputs=True, **fields))
        assert next(self._responses).WhichOneof("kind") == "opened"

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._responses:
            pass
        self.channel.close()


@pytest.fixture
def guard(security_swarm: SecuritySwarm) -> dict[str, object]:
    return dict(security_swarm.guard.info)


@pytest.fixture
def open_session_id(guard: dict[str, object]) -> Iterator[str]:
    session = _Open(guard, "probed-session")
    yield "probed-session"
    session.close()


def _history(info: dict[str, object], session_id: str, token: pb.Token) -> tuple[grpc.StatusCode, str]:
    channel, stub = peer_stub(info)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.History(pb.HistoryRequest(session_id=session_id, start=0, end=1, token=token), timeout=10)
    return caught.value.code(), caught.value.details().replace(session_id, "<id>")


def _attach(info: dict[str, object], session_id: str, token: pb.Token) -> tuple[grpc.StatusCode, str]:
    channel, stub = peer_stub(info)
    attach = pb.InferenceRequest(attach=pb.Attach(session_id=session_id, token=token))
    with channel, pytest.raises(grpc.RpcError) as caught:
        for _ in stub.Inference(iter([attach]), timeout=10):
            pass
    return caught.value.code(), caught.value.details().replace(session_id, "<id>")


def _forged(token: pb.Token) -> pb.Token:
    token.signature = bytes(len(token.signature))
    return token


def test_history_does_not_tell_a_stranger_which_sessions_exist(guard: dict[str, object], open_session_id: str) -> None:
    peer_id = str(guard["peer_id"])
    answers = {sid: _history(guard, sid, make_token(STRANGER, peer_id, "history", sid.encode()))
               for sid in (open_session_id, "no-such-session")}
    assert answers[open_session_id] == answers["no-such-session"], answers
    forged = {sid: _history(guard, sid, _forged(make_token(CLIENT, peer_id, "history", sid.encode())))
              for sid in (open_session_id, "no-such-session")}
    assert forged[open_session_id] == forged["no-such-session"], forged
    assert forged[open_session_id][0] == grpc.StatusCode.UNAUTHENTICATED


def test_attach_does_not_tell_a_stranger_which_sessions_exist(guard: dict[str, object], open_session_id: str) -> None:
    peer_id = str(guard["peer_id"])
    answers = {sid: _attach(guard, sid, make_token(STRANGER, peer_id, "attach", sid.encode()))
               for sid in (open_session_id, "no-such-session")}
    assert answers[open_session_id] == answers["no-such-session"], answers


def test_a_blocked_client_cannot_push_steps_as_the_previous_hop(security_swarm: SecuritySwarm,
                                                               guard: dict[str, object]) -> None:
    blocked = Identity.load_or_create(security_swarm.blocked_key)
    session = _Open(guard, "pushed-by-blocked", upstream_peer_id=blocked.peer_id)
    try:
        channel, stub = peer_stub(guard)
        token = make_token(blocked, str(guard["peer_id"]), "attach", b"pushed-by-blocked")
        requests = [pb.InferenceRequest(attach=pb.Attach(session_id="pushed-by-blocked", token=token)),
                    pb.InferenceRequest(session_id="pushed-by-blocked", step=pb.Step(
                        hidden=encode(torch.randn(1, 2, 64)), start_position=0))]
        with channel, pytest.raises(grpc.RpcError) as caught:
            for _ in stub.Inference(iter(requests), timeout=5):
                pass
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value
    finally:
        session.close()
    assert CLIENT.peer_id != blocked.peer_id
