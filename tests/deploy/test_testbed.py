"""The testbed on real network namespaces: 4 peers behind internet-like links generate exactly
what local transformers generates, and nothing survives a run, a failed start, Ctrl-C or a kill.

Needs root and network namespaces (skipped with the reason otherwise). Starts DHT nodes and peer
processes: run under the shared swarm lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from brigade_api_testkit import build_chat_tokenizer
from brigade_testkit import build_checkpoint, build_model

from brigade.deploy.testbed import Testbed, TestbedConfig, namespaces_available, sweep_stale
from brigade.deploy.testbed.netns import (
    PREFIX,
    Network,
    list_namespaces,
    namespace_pids,
    new_run_id,
    plan_hosts,
)
from brigade.deploy.testbed.profiles import get_profile

_REASON = namespaces_available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"testbed skipped: {_REASON}")

SPANS = ((0, 2), (2, 3), (3, 4), (4, 6))
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_checkpoint(tmp_path_factory.mktemp("testbed") / "tiny-llama", "llama", seed=5)
    # `brigade.deploy.testbed run` tokenizes its text prompt: without a tokenizer its client fails at once,
    # and a run that ended before the Ctrl-C test's signal exits 1, not 130.
    build_chat_tokenizer(folder)
    return folder


def _run_namespaces(run_id: str) -> list[str]:
    return [name for name in list_namespaces() if name.startswith(run_id + "-")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_four_peers_on_internet_links_match_transformers(checkpoint: Path, tmp_path: Path) -> None:
    testbed = Testbed(TestbedConfig(model=str(checkpoint), spans=SPANS, profile="internet", seed=1,
                                    log_dir=str(tmp_path / "logs")))
    prompt = [3, 141, 59, 26, 53, 58, 97]
    with testbed:
        addresses = {peer.host.address for peer in testbed.peers}
        assert len(addresses) == 4  # one host, one address per peer
        assert all(str(peer.info["address"]).endswith(":31330") for peer in testbed.peers)
        result = testbed.generate(prompt_ids=prompt, new_tokens=NEW_TOKENS)
        inside = [pid for ns in testbed.network.namespaces for pid in namespace_pids(ns)]
    reference = build_model("llama", seed=5)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert result.tokens == expected[0, len(prompt):].tolist()
    assert [host.role for host in result.hops] == ["p0", "p1", "p2", "p3"]
    # Latency is really there: with forwarding (the default) no step can beat one way into each hop
    # (12.5 to 40 ms each) plus one way back from the last.
    assert result.mode == "forwarding"
    assert 60.0 <= result.floor_ms <= 200.0
    assert min(result.step_ms) >= 0.95 * result.floor_ms, (result.step_ms, result.floor_ms)
    assert not _run_namespaces(testbed.run_id)
    assert not [pid for pid in inside if _alive(pid)]
    testbed.close()  # idempotent


def test_a_failed_start_removes_everything(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    testbed = Testbed(TestbedConfig(model=str(missing), spans=((0, 1),), profile="lan",
                                    log_dir=str(tmp_path / "logs"), start_timeout_s=60))
    with pytest.raises(RuntimeError, match="exited early"):
        testbed.start()
    assert not _run_namespaces(testbed.run_id)
    assert not [p for p in testbed.processes if p.alive()]


def _start_cli(checkpoint: Path, output: Path | None = None) -> tuple[subprocess.Popen[bytes], str, list[int]]:
    """Starts the testbed CLI and waits until its peers run; returns it, its run id and the pids inside.

    ``output``: where its stdout and stderr go (a failing test shows them).
    """
    with open(output or os.devnull, "wb") as sink:
        process = subprocess.Popen(
            # 480 new tokens (the model has 512 positions): a run long enough to be interrupted, never over
            # before the Ctrl-C test's signal lands (32 tokens were, on a quiet machine).
            [sys.executable, "-m", "brigade.deploy.testbed", "run", str(checkpoint), "--peers", "2", "--profile",
             "lan", "--new-tokens", "480"], stdout=sink, stderr=subprocess.STDOUT,
        )
    prefix = f"{PREFIX}{process.pid}-"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = [name for name in list_namespaces() if name.startswith(prefix)]
        peer_ns = [name for name in names if name.endswith("-p1")]
        if peer_ns and namespace_pids(peer_ns[0]):
            run_id = peer_ns[0].rsplit("-", 1)[0]
            return process, run_id, [pid for name in names for pid in namespace_pids(name)]
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    pytest.fail("the testbed CLI did not start its peers within 60 s")


def test_ctrl_c_tears_everything_down(checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "testbed.out"
    process, run_id, inside = _start_cli(checkpoint, output)
    # A Ctrl-C that lands in the few milliseconds a start-up step defers signals can be lost (seen once
    # under heavy load; see the closing note): a user presses again, and so does this test.
    ready_by = time.monotonic() + 60  # pressed once the peers are up and the client starts, not in a start-up step
    while " ready: " not in output.read_text(errors="replace") and time.monotonic() < ready_by:
        time.sleep(0.1)
    time.sleep(0.5)
    for _ in range(12):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(5)
            break
        except subprocess.TimeoutExpired:
            continue
    assert process.wait(5) == 130, output.read_text(errors="replace")[-4000:]
    assert not _run_namespaces(run_id)
    assert not [pid for pid in inside if _alive(pid)]


def test_a_killed_run_is_swept_and_a_live_one_is_not(checkpoint: Path) -> None:
    live_id = new_run_id()
    live = Network(live_id, plan_hosts(live_id, ["h0"], {}), get_profile("lan"), emulation="proxy")
    live.create()
    try:
        process, run_id, inside = _start_cli(checkpoint)
        process.kill()
        process.wait(10)
        assert _run_namespaces(run_id), "the namespaces of a killed run stay until swept"
        removed = sweep_stale()
        assert not _run_namespaces(run_id)
        assert not [name for name in removed if name.startswith(live_id)]
        assert _run_namespaces(live_id), "a live run's namespaces are never swept"
        assert not [pid for pid in inside if _alive(pid)]
    finally:
        live.close()
    assert not _run_namespaces(live_id)
