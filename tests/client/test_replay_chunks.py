"""A replay longer than the message cap still fails over, in pieces, with the exact tokens.

On a big model a long session's replay is over any message cap (48 MiB is about 1,536 positions at
hidden size 8192 in float32), and one sent as a single step is refused, so such a session could
never fail over. Here the cap is lowered instead of the model raised: the client's gRPC channel
takes messages of at most 16 KiB (about 60 positions of this tiny model's hidden size 64), and a
peer on the route is killed once the session holds about twice that. The replay must go in pieces
(and the previous hop's kept outputs be read back in pieces) and the tokens stay the reference's.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import torch
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS, build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.client.chunks import positions_per_message, replay_pieces
from brigade.deploy.launcher import LocalSwarm

CAP = 16 * 1024  # bytes of one gRPC message, each way, for this test's client
PROMPT = 30
NEW_TOKENS = 70
KILL_AT = 45  # new tokens before the kill: the session then holds 75 positions, ~19 KiB
SPANS = [(0, 3), (3, 6), (3, 6)]
PEER_ARGS = [*FAST_PEER_ARGS, "--prefill-chunk-tokens", "16"]  # answers stay far under the cap


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalSwarm, str]]:
    folder = tmp_path_factory.mktemp("replay-chunks")
    checkpoint = build_checkpoint(folder / "tiny-llama", "llama", seed=31)
    swarm = LocalSwarm(folder / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        launched = [swarm.add_peer(str(checkpoint), span, extra_args=PEER_ARGS, wait=False) for span in SPANS]
        for peer in launched:
            swarm.wait_ready(peer)
        yield swarm, str(checkpoint)
    finally:
        swarm.close()


def test_replay_pieces_keep_prefill_boundaries_and_stay_under_the_cap() -> None:
    # a 30-position prompt, then decode steps: the prompt stays one message, decode steps are merged
    assert replay_pieces([0, *range(30, 75)], 75, 20) == [(0, 20), (20, 30), (30, 50), (50, 70), (70, 75)]
    assert replay_pieces([0, 10, 13, 14], 15, 100) == [(0, 10), (10, 13), (13, 15)]
    assert positions_per_message(1, 64, 4, CAP) * (64 * 4) <= CAP


def test_result_checks_re_run_prefixes_over_the_message_cap(swarm) -> None:
    """A check re-runs the whole prefix ``[0, b)`` of its window: past the cap it must go in pieces too.
    (Before the failover test below, which kills a peer for good.)"""
    local, checkpoint = swarm
    prompt = torch.randint(0, 512, (1, 70), generator=torch.Generator().manual_seed(4))  # every window: > CAP
    with DistributedModelForCausalLM.from_pretrained(checkpoint, local.initial_peers, max_message_bytes=CAP,
                                                     verify_rate=1.0, verify_window=8) as model:
        model.generate(prompt, max_new_tokens=48)
        verifier = model.last_verifier
    assert verifier is not None
    checks = [result for result in verifier.results if result.layers == (3, 6)]
    assert any(result.outcome == "passed" for result in checks), checks
    assert all(result.outcome in ("passed", "skipped:cancelled") for result in checks), checks  # none failed


def test_a_replay_over_the_message_cap_fails_over_with_exact_tokens(swarm) -> None:
    local, checkpoint = swarm
    prompt = torch.randint(0, 512, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    expected = build_model("llama", seed=31).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
    by_id = {str(peer.info["peer_id"]): peer for peer in local.peers if peer.info}
    with DistributedModelForCausalLM.from_pretrained(checkpoint, local.initial_peers, max_message_bytes=CAP,
                                                     verify_rate=0.0) as model:
        tokens = []
        for step, new in enumerate(model.stream(prompt, max_new_tokens=NEW_TOKENS)):
            tokens.append(int(new[0]))
            if step == KILL_AT:
                victim = next(by_id[hop.split("[")[0]] for hop in model.last_route
                              if hop.endswith("[3:6]") and hop.split("[")[0] in by_id)
                victim.kill(signal.SIGKILL)
                victim.process.wait(10)
        events = model.last_events
    assert prompt[0].tolist() + tokens == expected
    replays = [event for event in events if event.kind == "failure" and event.replayed_positions]
    assert replays, events
    assert max(event.replayed_positions for event in replays) * 64 * 4 > CAP  # one message could not have held it

