"""A hop that misbehaves around forwarding cannot get honest peers blamed or the user wrong tokens.

Each misbehaving peer is the real peer process with one change (``tests/support/brigade_evil_peer.py``)
announcing a high throughput, so routes pick it first:

* ``lie:S`` answers History with right-shaped noise. When its successor dies, the successor's
  replacement is rebuilt from that History: the client binds it to what the liar signed, distrusts
  the liar, and rebuilds both hops from its own inputs.
* ``no-push:`` answers "forwarded" but never pushes. The honest next hop never gets its inputs; the
  client must take that for a broken forward (unlink the pair, carry it itself), not ban the honest peer.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from brigade_faults import peer_id as _id
from brigade_faults import start_layout as _start
from brigade_testkit import PEER_THREADS, build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm

pytestmark = pytest.mark.timeout(120)

NEW_TOKENS = 12
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("forwarding-faults") / "tiny-llama", "llama", seed=17)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return build_model("llama", seed=17)


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(seed))


def test_a_failover_history_other_than_what_was_signed_distrusts_its_peer(
    checkpoint: Path, reference: torch.nn.Module, tmp_path: Path
) -> None:
    """The next hop dies; the previous hop (a liar) answers History with noise. The client checks it
    against the liar's attestations, distrusts the liar and rebuilds from its own inputs: exact tokens."""
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        liar, _, first_tail, second_tail = _start(swarm, checkpoint, [
            ((0, 3), "lie:4"), ((0, 3), None), ((3, 6), None), ((3, 6), None)])
        tails = {_id(first_tail): first_tail, _id(second_tail): second_tail}
        ids = _prompt(3)
        expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers,
                                                         verify_rate=0.0) as model:
            tokens = []
            for step, new in enumerate(model.stream(ids, max_new_tokens=NEW_TOKENS)):
                tokens.append(int(new[0]))
                if step == 4:
                    assert model.last_route[0].startswith(_id(liar))
                    victim = tails[model.last_route[1].split("[")[0]]
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(10)
            assert ids[0].tolist() + tokens == expected[0].tolist()
            distrusted = [event.peer_id for event in model.last_events if event.kind == "distrust"]
            assert _id(liar) in distrusted, model.last_events
            assert not any(hop.startswith(_id(liar)) for hop in model.last_route)
            survivor = next(peer_id for peer_id in tails if tails[peer_id].alive())
            assert survivor not in model.bans.banned(), "the honest replacement was not blamed for the lie"


def test_an_upstream_that_claims_to_forward_but_never_pushes_gets_nobody_honest_banned(
    checkpoint: Path, reference: torch.nn.Module, tmp_path: Path
) -> None:
    """The first hop answers every step "forwarded" and pushes nothing; the honest second hop never
    answers. The client unlinks the pair and carries it itself: exact tokens, the honest peer unbanned.
    The prompt's step waits out the whole step deadline (3 s), longer than the retry budget (2 s): the
    budget counts recovery from the first failure on, so a silent peer cannot end the generation."""
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        silent, tail = _start(swarm, checkpoint, [((0, 3), "no-push:"), ((3, 6), None)])
        ids = _prompt(4)
        expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers, verify_rate=0.0,
                                                         step_timeout_s=3.0, retry_budget_s=2.0) as model:
            assert model.generate(ids, max_new_tokens=NEW_TOKENS).tolist() == expected.tolist()
            assert _id(tail) not in model.bans.banned(), model.last_events
            assert not [event for event in model.last_events if event.kind == "failure"], model.last_events
            assert any(event.kind == "unlink" and event.peer_id == _id(silent) for event in model.last_events)


def test_a_push_its_next_hop_refuses_unlinks_the_pair_at_once(
    checkpoint: Path, reference: torch.nn.Module, tmp_path: Path
) -> None:
    """The first hop drops the client's tickets from what it pushes: its honest next hop refuses every push
    and tells the client (``PushRefused``), which carries the pair itself from the prompt on, without
    waiting out the prompt's step deadline (60 s here) and without banning anyone."""
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        stripper, tail = _start(swarm, checkpoint, [((0, 3), "strip-tickets:"), ((3, 6), None)])
        ids = _prompt(5)
        expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers, verify_rate=0.0,
                                                         step_timeout_s=60.0) as model:
            began = time.monotonic()
            assert model.generate(ids, max_new_tokens=NEW_TOKENS).tolist() == expected.tolist()
            assert time.monotonic() - began < 30, model.last_events  # told, not waited out
            assert not [event for event in model.last_events if event.kind == "failure"], model.last_events
            unlinked = [event for event in model.last_events if event.kind == "unlink"]
            assert [event.peer_id for event in unlinked] == [_id(stripper)], model.last_events
            assert "refused its previous hop's push" in unlinked[0].reason
            assert _id(tail) not in model.bans.banned()
