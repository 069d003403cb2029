"""Cheaters that dodge result checks instead of passing them are distrusted all the same; a free identity
that signs a false handover cannot get its honest upstream neighbour distrusted.

Real processes: the embedded trained model (6 layers, split at 3), honest peers in float32, bfloat16
and nf4, and cheaters (``tests/support/brigade_evil_peer.py``), each a real peer with one change:

- ``a_shift`` signs every result at its position plus one: a chain of attestations that covers
  nothing a check asks about (every check of it was skipped as "unattested");
- ``b_refuse`` refuses every ``History`` read-back (every check of it was skipped as "unavailable");
- ``b4_skip`` announces nf4 and leaves out layer 4 (the second of 3:6), which changes each position
  by 0.08 to 0.28 of (input + what the span adds): inside the 0.3 that an nf4 token bought. It is
  caught because the client's own nf4 tolerance is tighter, and because two nf4 peers (``b4`` and
  ``b_refuse``, which computes honestly) hold the same weights and are compared tightly;
- ``b_frame`` computes honestly but signs a wrong hash of the input its upstream pushed it (both
  neighbours were accused, and the distrusted set is shared by every session of the model);
- ``a_push`` answers its client honestly but pushes ``b32`` noisy bytes, with a valid attestation of
  them (a re-run from its signed outputs then made honest ``b32`` look wrong, and outvoted it);
- ``a_unsigned`` pushes the same noisy bytes with its honest attestation, which ``b32`` cannot match;
- ``a_madeup`` pushes honestly, then (once, at position 40) makes up a newer step over every position so
  far (random, validly signed): without the client's ticket for it, ``b32`` refuses it
  (``protocol/tickets.py``).

Each run is one session through a chosen route, fed a fixed token sequence for up to 60 windows of
2 steps, checked at the default rate (5%, stratified, with extra random checks on top).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from brigade_evil import MODEL, CheatSwarm, PeerSpec, RunOutcome, reference_outputs, run_session

from brigade.client import DistributedModelForCausalLM

PROMPT = 8
WINDOW = 2
WINDOWS = 60

LAYOUT = [
    PeerSpec("a32", (0, 3)),
    PeerSpec("a16", (0, 3), dtype="bfloat16"),
    PeerSpec("a_shift", (0, 3), cheat="shift-attestation:1"),
    PeerSpec("a_push", (0, 3), cheat="push-other:0.5"),
    PeerSpec("a_unsigned", (0, 3), cheat="push-unsigned:0.5"),
    PeerSpec("a_madeup", (0, 3), cheat="made-up-step:40"),
    PeerSpec("b32", (3, 6)),
    PeerSpec("b4", (3, 6), quant="nf4"),
    PeerSpec("b_refuse", (3, 6), quant="nf4", cheat="refuse-history:"),  # computes honestly: re-runs checks well
    PeerSpec("b4_skip", (3, 6), quant="nf4", cheat="skip:1"),
    PeerSpec("b_frame", (3, 6), cheat="frame-upstream:"),
]
CHEATERS = {spec.name for spec in LAYOUT if spec.cheat}  # any of them may be caught re-running a check


@pytest.fixture(scope="module")
def dodge_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CheatSwarm]:
    swarm = CheatSwarm(tmp_path_factory.mktemp("dodge-swarm"), LAYOUT)
    swarm.start()
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def model(dodge_swarm: CheatSwarm) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(MODEL, dodge_swarm.swarm.initial_peers,
                                                     verify_window=WINDOW) as model:
        yield model


def session(model: DistributedModelForCausalLM, swarm: CheatSwarm, route: list[str], seed: int,
            stop_when_caught: bool = True) -> tuple[RunOutcome, torch.Tensor]:
    tokens = torch.randint(3, 4096, (1, PROMPT + WINDOWS * WINDOW - 1), generator=torch.Generator().manual_seed(seed))
    outcome = model._loop.run(run_session(model, swarm, route, tokens, PROMPT, WINDOW, seed=seed,
                                          stop_when_caught=stop_when_caught), 120.0)
    return outcome, tokens


def distrusted(outcome: RunOutcome, swarm: CheatSwarm) -> set[str]:
    return {swarm.names[peer_id] for report in outcome.reports for peer_id in report.accused}


def reports_against(outcome: RunOutcome, swarm: CheatSwarm, name: str) -> list:
    return [report for report in outcome.reports if swarm.ids[name] in report.accused]


def caught_window(outcome: RunOutcome, swarm: CheatSwarm, name: str) -> int | None:
    """The first window whose check caught ``name`` (0-based; a verdict on arrival counts as window 0)."""
    windows = [max(0, (report.window[1] - PROMPT + 1) // WINDOW - 1)
               for report in reports_against(outcome, swarm, name)]
    return min(windows, default=None)


def test_a_peer_that_signs_shifted_positions_is_distrusted_on_arrival(model, dodge_swarm: CheatSwarm) -> None:
    outcome, tokens = session(model, dodge_swarm, ["a_shift", "b32"], seed=1)
    assert "a_shift" in distrusted(outcome, dodge_swarm) <= CHEATERS, outcome.reports
    assert reports_against(outcome, dodge_swarm, "a_shift")[0].kind == "misattested"
    assert "a_shift" not in outcome.final_route
    assert (caught_window(outcome, dodge_swarm, "a_shift") or 0) < WINDOWS
    if outcome.positions == tokens.shape[1]:  # it ran to the end on honest peers: the outputs are right
        reference = reference_outputs(tokens)[:, -1]
        assert float((outcome.last_output - reference).norm() / reference.norm()) < 0.05


def test_a_peer_that_refuses_history_is_distrusted_within_60_windows(model, dodge_swarm: CheatSwarm) -> None:
    outcome, _ = session(model, dodge_swarm, ["a32", "b_refuse"], seed=2)
    assert "b_refuse" in distrusted(outcome, dodge_swarm) <= CHEATERS, (outcome.reports, outcome.stats)
    assert (caught_window(outcome, dodge_swarm, "b_refuse") or 0) < WINDOWS
    assert reports_against(outcome, dodge_swarm, "b_refuse")[0].kind == "refused"
    assert "b_refuse" not in outcome.final_route


def test_a_peer_announcing_nf4_that_skips_a_layer_is_distrusted_within_60_windows(
        model, dodge_swarm: CheatSwarm) -> None:
    outcome, _ = session(model, dodge_swarm, ["a32", "b4_skip"], seed=3)
    assert "b4_skip" in distrusted(outcome, dodge_swarm) <= CHEATERS, (outcome.results, outcome.stats)
    assert (caught_window(outcome, dodge_swarm, "b4_skip") or 0) < WINDOWS
    assert "b4_skip" not in outcome.final_route


def test_a_false_handover_signature_does_not_get_the_honest_upstream_distrusted(
        model, dodge_swarm: CheatSwarm) -> None:
    """The framer holds its upstream's signed attestation of the push, and signs another input: its own
    contradiction, seen on arrival (``client/handover.py``)."""
    outcome, _ = session(model, dodge_swarm, ["a32", "b_frame"], seed=4)
    assert "b_frame" in distrusted(outcome, dodge_swarm), (outcome.reports, outcome.results)
    assert reports_against(outcome, dodge_swarm, "b_frame")[0].kind == "misattested"
    assert "a32" not in distrusted(outcome, dodge_swarm), outcome.reports
    assert "a32" in outcome.final_route


def _right_at_the_end(outcome: RunOutcome, tokens: torch.Tensor) -> bool:
    reference = reference_outputs(tokens)[:, -1]
    return outcome.positions == tokens.shape[1] and float(
        (outcome.last_output - reference).norm() / reference.norm()) < 0.05


def test_an_upstream_that_pushes_other_bytes_than_it_signs_is_distrusted_not_its_next_hop(
        model, dodge_swarm: CheatSwarm) -> None:
    outcome, tokens = session(model, dodge_swarm, ["a_push", "b32"], seed=5, stop_when_caught=False)
    assert "a_push" in distrusted(outcome, dodge_swarm), (outcome.reports, outcome.results)
    assert reports_against(outcome, dodge_swarm, "a_push")[0].kind == "misattested"
    assert (caught_window(outcome, dodge_swarm, "a_push") or 0) == 0  # on arrival, at the first pushed step
    assert "b32" not in distrusted(outcome, dodge_swarm) and "b32" in outcome.final_route, outcome.reports
    assert _right_at_the_end(outcome, tokens)


def test_a_push_its_next_hop_cannot_vouch_for_is_carried_by_the_client_instead(
        model, dodge_swarm: CheatSwarm) -> None:
    outcome, tokens = session(model, dodge_swarm, ["a_unsigned", "b32"], seed=6, stop_when_caught=False)
    assert "b32" not in distrusted(outcome, dodge_swarm) and "b32" in outcome.final_route, outcome.reports
    assert not [result for result in outcome.results if result.outcome == "caught"], outcome.results
    assert _right_at_the_end(outcome, tokens)  # what b32 computed from the noisy push never counted


def test_an_upstream_that_makes_up_steps_cannot_rewrite_its_next_hops_cache(
        model, dodge_swarm: CheatSwarm) -> None:
    """Before tickets, ``b32`` took the made-up step (a newer step id may rewind), its cache was rewritten
    under results the client skipped, and every later output was wrong with ``b32`` to blame."""
    outcome, tokens = session(model, dodge_swarm, ["a_madeup", "b32"], seed=7, stop_when_caught=False)
    assert "b32" not in distrusted(outcome, dodge_swarm) and "b32" in outcome.final_route, outcome.reports
    assert _right_at_the_end(outcome, tokens)
    # The made-up step was pushed and refused: the pair is unlinked (the refusal told on b32's stream, or
    # a_madeup's own forward error on its next push, whichever the client reads first), nobody banned.
    unlinked = [event for event in outcome.events if event.kind == "unlink"]
    assert all(event.peer_id == dodge_swarm.ids["a_madeup"] for event in unlinked), outcome.events
    banned = [event for event in outcome.events if event.kind == "failure"]
    assert dodge_swarm.ids["b32"] not in [event.peer_id for event in banned], outcome.events
