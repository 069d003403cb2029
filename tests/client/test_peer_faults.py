"""No peer's word alone ends a user's generation: refusals, compute failures and short answers are routed around.

Each misbehaving peer is the real peer process with one change (``tests/support/brigade_evil_peer.py``)
and announces a high throughput, so routes pick it first. The client must ban it and finish with
exactly transformers' tokens, whatever status it answered with: INVALID_ARGUMENT and OUT_OF_RANGE
say "your request is wrong", which is only that peer's word (the client checked its own request).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from brigade_faults import peer_id as _id
from brigade_faults import start_layout as _start
from brigade_testkit import PEER_THREADS, build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm

NEW_TOKENS = 16
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("faults") / "tiny-llama", "llama", seed=13)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return build_model("llama", seed=13)


@pytest.fixture(scope="module")
def faulty_swarm(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalSwarm, list]]:
    swarm = LocalSwarm(tmp_path_factory.mktemp("faulty-swarm"), peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        peers = _start(swarm, checkpoint, [((0, 3), "refuse:invalid"), ((0, 3), "crash:"), ((3, 6), "refuse:range"),
                                           ((0, 3), None), ((3, 6), None)])
        yield swarm, peers
    finally:
        swarm.close()


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(seed))


def test_peers_that_refuse_every_step_or_fail_to_compute_are_routed_around(
    faulty_swarm: tuple[LocalSwarm, list], checkpoint: Path, reference: torch.nn.Module
) -> None:
    swarm, (invalid, crash, out_of_range, *_) = faulty_swarm
    ids = _prompt(1)
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(set(expected[0, ids.shape[1] :].tolist())) >= NEW_TOKENS // 3, "reference tokens must vary"
    with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
        assert model.generate(ids, max_new_tokens=NEW_TOKENS).tolist() == expected.tolist()
        failed = {event.peer_id for event in model.last_events if event.kind == "failure"}
        assert {_id(invalid), _id(crash), _id(out_of_range)} <= failed, model.last_events
        assert not {_id(invalid), _id(crash), _id(out_of_range)} & {hop.split("[")[0] for hop in model.last_route}
        # The stateless forward routes around them the same way (its own ban, budget and re-route).
        model.bans = type(model.bans)(model.client_config.ban_base_s, model.client_config.ban_max_s)
        with torch.no_grad():
            want = reference(expected).logits
        torch.testing.assert_close(model(expected).logits, want, atol=1e-4, rtol=1e-4)


def test_a_request_the_model_cannot_take_is_the_callers_error_before_any_peer_is_asked(
    faulty_swarm: tuple[LocalSwarm, list], checkpoint: Path
) -> None:
    swarm, _ = faulty_swarm
    with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
        with pytest.raises(ValueError, match="more than the model's 512"):
            model.generate(_prompt(2), max_new_tokens=600)
        assert not model.bans.banned(), "no peer was blamed for the caller's own mistake"


def test_a_short_history_during_failover_rebuilds_that_peer_too(
    checkpoint: Path, reference: torch.nn.Module, tmp_path: Path
) -> None:
    """The next hop dies; its replacement needs the previous hop's kept outputs, which that peer returns
    short. The client treats that as the previous peer's failure and rebuilds both from its own inputs."""
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        liar, _, first_tail, second_tail = _start(swarm, checkpoint, [
            ((0, 3), "short-history:2"), ((0, 3), None), ((3, 6), None), ((3, 6), None)])
        tails = {_id(first_tail): first_tail, _id(second_tail): second_tail}
        ids = _prompt(3)
        expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
            tokens = []
            for step, new in enumerate(model.stream(ids, max_new_tokens=NEW_TOKENS)):
                tokens.append(int(new[0]))
                if step == 5:
                    assert model.last_route[0].startswith(_id(liar))
                    victim = tails[model.last_route[1].split("[")[0]]
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(10)
            assert ids[0].tolist() + tokens == expected[0].tolist()
            failed = [event.peer_id for event in model.last_events if event.kind == "failure"]
            assert _id(liar) in failed, model.last_events
            survivor = next(peer_id for peer_id in tails if tails[peer_id].alive())
            assert survivor not in model.bans.banned(), "the honest replacement was not blamed for the short History"


def test_a_batch_invariant_client_on_ordinary_peers_is_told_why_none_serve(
    faulty_swarm: tuple[LocalSwarm, list], checkpoint: Path
) -> None:
    from brigade.protocol.errors import MissingLayersError

    swarm, _ = faulty_swarm
    with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers, batch_invariant=True,
                                                     route_wait_s=1.0, retry_budget_s=1.0) as model:
        with pytest.raises(MissingLayersError, match="without --batch-invariant"):
            model.generate(_prompt(3), max_new_tokens=2)
