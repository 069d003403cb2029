"""Every servicer method fuzzed against a live peer: no crash, no hang, no unexpected status, no leak.

Scenarios (``brigade_servicer_fuzz``) interleave Inference streams (open, step, attach, relink and
empty messages in any order, on several streams that meet in the same sessions, then half-close or
cancel) with Forward, History and Info calls, mostly close to valid and validly signed so that they
reach the session logic. The peer is the real servicer, sessions and compute thread behind a real
TLS gRPC server, in this process (``brigade_inproc_peer``), so that an exception escaping the
servicer, an error logged on its loop, or a session or cache page left behind after every stream has
ended fails the test. Afterwards an honest session still computes the right thing.

Bounded for CI; ``BRIGADE_FUZZ_EXAMPLES`` raises the example count for a longer local run. The
coverage-guided counterpart is ``tests/fuzz/atheris_servicer.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from brigade_inproc_peer import InProcessPeer
from brigade_servicer_fuzz import Parties, ScenarioRunner, problems, scenarios
from hypothesis import HealthCheck, given, settings

from brigade.client.loop import LoopThread
from brigade.peer.config import PeerConfig
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.tensors import decode, encode
from brigade.protocol.tokens import make_token

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("BRIGADE_FUZZ_EXAMPLES", "150"))
DRAIN_S = 10.0  # after a scenario's streams have ended, its sessions must be gone within this


class ErrorRecords(logging.Handler):
    """Collects every ERROR logged while fuzzing (an exception on the server's loop, a failed pass)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def peer(llama_checkpoint: Path) -> Iterator[InProcessPeer]:
    config = PeerConfig(model=str(llama_checkpoint), cache_tokens=2048, num_threads=1, max_admission_wait_s=0.2,
                        forward_timeout_s=2.0, session_idle_timeout_s=60.0, batch_window_ms=0.0)
    with InProcessPeer(llama_checkpoint, config) as running:
        yield running


@pytest.fixture(scope="module")
def client_loop() -> Iterator[LoopThread]:
    loop = LoopThread("fuzz-client")
    yield loop
    loop.close()


def wait_drained(peer: InProcessPeer) -> dict[str, object]:
    deadline = time.monotonic() + DRAIN_S
    while True:
        usage = peer.usage()
        if (usage["sessions"] == 0 and usage["free_tokens"] == usage["capacity_tokens"] and not usage["owners"]
                and not usage["owner_pages"]):
            return usage
        if time.monotonic() > deadline:
            return usage
        time.sleep(0.02)


def test_servicer_survives_fuzzed_scenarios(peer: InProcessPeer, client_loop: LoopThread) -> None:
    assert peer.tls is not None
    parties = Parties(peer.identity, str(peer.info["address"]), str(peer.info["tls_cert"]))
    runner = ScenarioRunner(parties)
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    played = {"scenarios": 0, "calls": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scenario=scenarios(parties))
    def play(scenario: list[tuple[object, ...]]) -> None:
        outcomes = client_loop.run(runner.run(scenario), 120.0)
        played["scenarios"] += 1
        played["calls"] += len(outcomes)
        assert not problems(outcomes), problems(outcomes)
        usage = wait_drained(peer)
        assert usage["sessions"] == 0 and usage["free_tokens"] == usage["capacity_tokens"], usage
        assert not usage["owners"] and not usage["owner_pages"], usage
        assert not errors.records, [errors.format(record) for record in errors.records]

    try:
        play()
    finally:
        logging.getLogger().removeHandler(errors)
        client_loop.run(runner.close(), 10.0)
    assert played["scenarios"] >= min(EXAMPLES, 50)
    honest_session_still_works(peer, parties, client_loop)


def honest_session_still_works(peer: InProcessPeer, parties: Parties, client_loop: LoopThread) -> None:
    """A prefill and a decode step on a fresh session equal a stateless pass over the same positions."""
    runner = ScenarioRunner(parties)
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(7))

    async def run() -> tuple[torch.Tensor, torch.Tensor]:
        stub = runner.stub()
        token = make_token(parties.client, parties.peer.peer_id, "open", b"honest-after-fuzz")
        call = stub.Inference()
        await call.write(pb.InferenceRequest(open=pb.OpenSession(
            session_id="honest-after-fuzz", start_layer=0, end_layer=6, batch_size=1, max_length=8, token=token)))
        assert (await call.read()).WhichOneof("kind") == "opened"
        await call.write(pb.InferenceRequest(session_id="honest-after-fuzz", step=pb.Step(
            hidden=encode(hidden[:, :4]), start_position=0, step_id=1)))
        prefill = decode((await call.read()).result.hidden)
        await call.write(pb.InferenceRequest(session_id="honest-after-fuzz", step=pb.Step(
            hidden=encode(hidden[:, 4:]), start_position=4, step_id=2)))
        decoded = decode((await call.read()).result.hidden)
        await call.done_writing()
        stateless = await stub.Forward(pb.ForwardRequest(
            start_layer=0, end_layer=6, hidden=encode(hidden),
            token=make_token(parties.client, parties.peer.peer_id, "forward")), timeout=30)
        await runner.close()
        return torch.cat([prefill, decoded], dim=1), decode(stateless.hidden)

    session_out, stateless_out = client_loop.run(run(), 60.0)
    torch.testing.assert_close(session_out, stateless_out, atol=1e-4, rtol=1e-4)
    assert wait_drained(peer)["sessions"] == 0
