"""Cheating peers are caught by result checks and dropped; honest peers of every precision never are.

Real processes: a bootstrap node and 8 peers of the embedded trained model (6 layers, split at 3):
honest ones in float32, bfloat16 and nf4, and three cheaters, each a real peer with one change
(``tests/support/brigade_evil_peer.py``): ``a_skip`` leaves out one of its 3 layers, ``b_noise``
adds noise of 0.2 times the RMS of what its span adds, ``b_lie`` computes honestly but alters what
it hands back to checks. Each run is one session at the default rate (5%, stratified) through a
route with one cheater on it, fed a fixed token sequence for 60 windows (of 2 steps, to keep the
test short: the rate is per window, whatever its length). Every peer not on the route is free to
re-run checks, cheaters included (a cheating re-runner must be outvoted too).

Measured here: 20 runs, every cheater caught within 60 windows (most in the first block of 20),
no honest peer ever accused; the module takes about a minute (most of it starting 8 peers).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest
import torch
from brigade_evil import CHEATERS, MODEL, CheatSwarm, RunOutcome, reference_outputs, run_session

from brigade.client import DistributedModelForCausalLM

PROMPT = 8
WINDOW = 2  # steps per window in these tests (the default is 16)
WINDOWS = 60
RUNS = [  # (route, expected kind of report against its cheater)
    *[(["a32", "b_noise"], "outvoted"), (["a16", "b_noise"], "outvoted")] * 4,
    *[(["a_skip", "b32"], "outvoted"), (["a_skip", "b16"], "outvoted"), (["a_skip", "b4"], "outvoted")] * 3,
    (["a_skip", "b16"], "outvoted"),
    *[(["a32", "b_lie"], "contradiction"), (["a16", "b_lie"], "contradiction")],
]
COMPUTE_CHEATERS = {"a_skip", "b_noise"}


@pytest.fixture(scope="module")
def cheat_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CheatSwarm]:
    swarm = CheatSwarm(tmp_path_factory.mktemp("cheat-swarm"))
    swarm.start()
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def runs(cheat_swarm: CheatSwarm) -> list[tuple[list[str], str, RunOutcome, float]]:
    """Every run of ``RUNS``: (route, expected kind, outcome, last output's error against float32)."""
    outcomes = []
    with DistributedModelForCausalLM.from_pretrained(MODEL, cheat_swarm.swarm.initial_peers,
                                                     verify_window=WINDOW) as model:
        for index, (route, kind) in enumerate(RUNS):
            tokens = torch.randint(3, 4096, (1, PROMPT + WINDOWS * WINDOW - 1),
                                   generator=torch.Generator().manual_seed(index))
            outcome = model._loop.run(run_session(model, cheat_swarm, route, tokens, PROMPT, WINDOW, seed=index),
                                      120.0)
            reference = reference_outputs(tokens)[:, -1]
            error = float((outcome.last_output - reference).norm() / reference.norm())
            outcomes.append((route, kind, outcome, error))
    return outcomes


def test_cheaters_are_caught_within_60_windows(runs, cheat_swarm: CheatSwarm) -> None:
    caught = 0
    for route, kind, outcome, _ in runs:
        assert outcome.cheater is not None and outcome.cheater in route
        against = [report for report in outcome.reports if cheat_swarm.ids[outcome.cheater] in report.accused]
        if outcome.caught_window is not None and outcome.caught_window < WINDOWS:
            caught += 1
            assert against[0].kind == kind, against[0]
            assert against[0].attestations, "a report carries the accused's signed attestations"
            assert outcome.cheater not in outcome.final_route, "the session must have left the cheater"
    assert caught >= 0.95 * len(runs), f"caught in {caught} of {len(runs)} runs"


def test_honest_peers_of_every_precision_are_never_accused(runs, cheat_swarm: CheatSwarm) -> None:
    checked = collections.Counter()
    for _, _, outcome, _ in runs:
        for report in outcome.reports:
            accused = {cheat_swarm.names[peer_id] for peer_id in report.accused}
            assert accused <= CHEATERS, f"honest peer accused: {report}"
        for result in outcome.results:
            name = cheat_swarm.names[result.peer_id]
            assert not result.outcome.startswith("skipped:error"), result
            if name not in CHEATERS and result.outcome in ("passed", "caught"):
                checked[name] += 1  # "caught" here: its re-running peer was the cheater
                assert result.outcome == "passed" or {cheat_swarm.names[p] for p in result.accused} <= CHEATERS
    assert {"a32", "a16", "b32", "b16", "b4"} <= set(checked), checked


def test_after_dropping_a_cheater_the_session_computes_right(runs) -> None:
    rebuilt = 0
    for _, _, outcome, error in runs:
        if outcome.caught_window is not None and not COMPUTE_CHEATERS & set(outcome.final_route):
            rebuilt += 1
            assert error < 0.05, (outcome.route, outcome.final_route, error)  # bfloat16 / nf4 peers: ~0.5%-3%
    assert rebuilt >= len(runs) // 2


def test_checks_are_skipped_and_counted_when_nobody_else_serves_the_layers(cheat_swarm: CheatSwarm) -> None:
    only = frozenset({cheat_swarm.ids["a32"], cheat_swarm.ids["b32"]})
    with DistributedModelForCausalLM.from_pretrained(MODEL, cheat_swarm.swarm.initial_peers, allowed_peers=only,
                                                     verify_rate=1.0, verify_window=4) as model:
        prompt = torch.tensor([[5, 17, 300, 41, 9, 1000, 77]])
        out = model.generate(prompt, max_new_tokens=17)
        verifier = model.last_verifier
    assert out.shape == (1, 24)
    assert verifier is not None and verifier.stats.due >= 3
    assert verifier.stats.skipped.get("no_checker", 0) >= 2
    assert not verifier.stats.caught and not verifier.stats.passed


def test_generate_with_every_window_checked_among_honest_peers(cheat_swarm: CheatSwarm) -> None:
    """A left-padded batch whose prompt is prefilled in chunks (peers here chunk at 16 positions)."""
    honest = frozenset(cheat_swarm.ids[name] for name in ("a32", "a16", "b32", "b16"))
    with DistributedModelForCausalLM.from_pretrained(MODEL, cheat_swarm.swarm.initial_peers, allowed_peers=honest,
                                                     verify_rate=1.0, verify_window=4) as model:
        ids = torch.randint(3, 4096, (2, 40), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(ids)
        mask[1, :13] = 0
        model.generate(ids, attention_mask=mask, max_new_tokens=24)
        verifier = model.last_verifier
        assert verifier is not None and verifier.stats.passed >= 4, verifier.stats
        assert not verifier.stats.caught and not verifier.stats.unresolved and "error" not in verifier.stats.skipped
        assert not model.distrusted
