"""Coverage-guided fuzzing of a peer's servicer with atheris: the open-ended counterpart of
``tests/security/test_fuzz_servicer.py``.

Not a pytest test. It serves the tiny Llama's 6 layers from an in-process peer (``brigade_inproc_peer``:
the real servicer, sessions and compute thread behind a real TLS gRPC server, so that atheris's
coverage reaches them) and feeds libFuzzer's inputs to the same scenario strategy the hypothesis test
uses (``brigade_servicer_fuzz.scenarios``) through hypothesis's ``fuzz_one_input``: libFuzzer mutates
the bytes hypothesis draws its choices from, and keeps the inputs that reach new servicer code.

A crash is a status outside ``EXPECTED_CODES``, a stream that does not end after the client
half-closes (a hang), an ERROR logged by the peer, or a session or cache page still held after every
stream of a scenario has ended.

Run (atheris is not a project dependency; it ships wheels for CPython 3.11 on Linux x86-64). It starts
peer processes' worth of threads, so hold the swarm lock on a shared machine:

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_servicer.py --write-seeds /tmp/brigade-servicer-corpus
    flock /tmp/brigade-swarm.lock .venv/bin/python tests/fuzz/atheris_servicer.py /tmp/brigade-servicer-corpus \
        -max_total_time=600 -max_len=4096 -len_control=0 -timeout=120 -rss_limit_mb=6144 \
        -artifact_prefix=/tmp/brigade-servicer-corpus/

Hypothesis needs a few hundred bytes of choices for one scenario and ignores shorter inputs, hence the
seeds (random bytes: every one is a scenario) and ``-len_control=0`` (libFuzzer would otherwise start
from 4-byte inputs). ``-runs=N`` bounds the number of inputs instead; a ``crash-*`` file given as the
only argument replays that scenario.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

# Libraries first, uninstrumented (instrumenting torch or transformers alone takes minutes).
import grpc  # noqa: F401
import hypothesis  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
from hypothesis import HealthCheck, given, settings

with atheris.instrument_imports(include=["brigade.peer", "brigade.protocol", "brigade.kernels"]):
    from brigade_inproc_peer import InProcessPeer
    from brigade_servicer_fuzz import Parties, ScenarioRunner, problems, scenarios
    from brigade_testkit import build_checkpoint

    from brigade.client.loop import LoopThread
    from brigade.peer.config import PeerConfig

DRAIN_S = 10.0


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def wait_drained(peer: InProcessPeer) -> dict[str, object]:
    deadline = time.monotonic() + DRAIN_S
    while True:
        usage = peer.usage()
        drained = (usage["sessions"] == 0 and usage["free_tokens"] == usage["capacity_tokens"]
                   and not usage["owners"] and not usage["owner_pages"])
        if drained or time.monotonic() > deadline:
            return usage
        time.sleep(0.02)


def write_seeds(folder: Path, count: int = 16, size: int = 2048) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(count):
        (folder / f"seed-{index:02d}").write_bytes(rng.randbytes(size))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(Path(sys.argv[2]))
        return
    logging.basicConfig(level=logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix="brigade-atheris-servicer-"))
    checkpoint = build_checkpoint(folder / "tiny-llama", "llama")
    config = PeerConfig(model=str(checkpoint), cache_tokens=2048, num_threads=1, max_admission_wait_s=0.2,
                        forward_timeout_s=2.0, session_idle_timeout_s=60.0, batch_window_ms=0.0)
    peer = InProcessPeer(checkpoint, config).start()
    parties = Parties(peer.identity, str(peer.info["address"]), str(peer.info["tls_cert"]))
    runner = ScenarioRunner(parties)
    client_loop = LoopThread("atheris-client")
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    played = {"scenarios": 0, "calls": 0}

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(scenario=scenarios(parties))
    def play(scenario: list[tuple[object, ...]]) -> None:
        outcomes = client_loop.run(runner.run(scenario), 120.0)
        played["scenarios"] += 1
        played["calls"] += len(outcomes)
        if played["scenarios"] % 10 == 1:  # libFuzzer reports inputs; these are the scenarios that ran
            sys.stderr.write(f"played {played['scenarios']} scenarios, {played['calls']} calls\n")
        found = problems(outcomes)
        if found:
            raise AssertionError(f"servicer misbehaved: {found}")
        usage = wait_drained(peer)
        if usage["sessions"] or usage["free_tokens"] != usage["capacity_tokens"] or usage["owners"]:
            raise AssertionError(f"a scenario left state behind: {usage}")
        if errors.records:
            messages = [errors.format(record) for record in errors.records]
            errors.records.clear()
            raise AssertionError(f"the peer logged errors: {messages}")

    atheris.Setup(sys.argv, play.hypothesis.fuzz_one_input)
    try:
        atheris.Fuzz()
    finally:  # libFuzzer exits the process itself at the end of a bounded run; this covers the rest
        client_loop.run(runner.close(), 10.0)
        client_loop.close()
        peer.close()


if __name__ == "__main__":
    main()
