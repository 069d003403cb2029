"""Generation survives peers that are killed, hung or drained mid-generation: same tokens.

The swarm covers every layer twice with different boundaries (0:8 x2, 8:16 x2, 4:12), so a
replacement for a failed hop may be one peer or two. Killed peers restart with the same
identity between generations, as a volunteer's machine would.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from itertools import pairwise

import pytest
import torch
from brigade_testkit import FAST_PEER_ARGS, ChaosSwarm, build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM, core
from brigade.deploy.launcher import LaunchedProcess

LAYERS = 16
NEW_TOKENS = 24
GENERATIONS = 6  # kill -9 runs in CI (12 kills); benchmarks/chaos.py runs 100


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChaosSwarm, DistributedModelForCausalLM]]:
    folder = tmp_path_factory.mktemp("chaos")
    checkpoint = build_checkpoint(folder / "tiny-llama-16", "llama", seed=21, num_hidden_layers=LAYERS)
    # Batch-invariant peers: a batch-invariant client's replays are then bit-exact (the default client
    # still merges its decode steps in replays, and is tested here as well).
    swarm = ChaosSwarm(folder, checkpoint, LAYERS, peer_args=[*FAST_PEER_ARGS, "--batch-invariant"])
    try:
        swarm.start()
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.swarm.initial_peers) as model:
            yield swarm, model
    finally:
        swarm.swarm.close()


@pytest.fixture(scope="module")
def reference():
    return build_model("llama", seed=21, num_hidden_layers=LAYERS)


def prompt_for(generation: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + generation)
    length = int(torch.randint(4, 12, (1,), generator=generator))
    return torch.randint(0, 512, (1, length), generator=generator)


def run_with_faults(model: DistributedModelForCausalLM, prompt: torch.Tensor, fault_steps: set[int],
                    fault) -> list[int]:
    tokens = []
    for step, new in enumerate(model.stream(prompt, max_new_tokens=NEW_TOKENS)):
        tokens.append(int(new[0]))
        if step in fault_steps:
            fault(list(model.last_route))
    return prompt[0].tolist() + tokens


def test_kill_minus_9_twice_per_generation(chaos, reference) -> None:
    swarm, model = chaos
    rng = random.Random(1)
    failures = 0
    for generation in range(GENERATIONS):
        prompt = prompt_for(generation)
        expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()

        def kill(route: list[str]) -> None:
            victim = swarm.pick_victim(route, rng)
            if victim is not None:
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait(10)

        steps = set(rng.sample(range(1, NEW_TOKENS - 1), 2))
        assert run_with_faults(model, prompt, steps, kill) == expected, f"generation {generation} diverged"
        assert all(event.kind == "failure" for event in model.last_events)
        failures += len(model.last_events)
        swarm.heal()
    assert failures >= GENERATIONS, "most kills should have hit the route in use"


def test_kill_minus_9_with_client_driven_hops(chaos, reference) -> None:
    """The same guarantee when the client carries every activation itself (forwarding off)."""
    swarm, forwarding_model = chaos
    rng = random.Random(4)
    with DistributedModelForCausalLM.from_pretrained(
        forwarding_model.model_path, swarm.swarm.initial_peers, forwarding=False
    ) as model:
        for generation in range(2):
            prompt = prompt_for(30 + generation)
            expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()

            def kill(route: list[str]) -> None:
                victim = swarm.pick_victim(route, rng)
                if victim is not None:
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(10)

            steps = set(rng.sample(range(1, NEW_TOKENS - 1), 2))
            assert run_with_faults(model, prompt, steps, kill) == expected, f"generation {generation} diverged"
            assert not any(model.last_forwarding)
            swarm.heal()


def _capture_step_outputs(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[torch.Tensor]]:
    """Every session step's output (the last hop's hidden states), by session, as the client saw them."""
    outputs: dict[int, list[torch.Tensor]] = {}
    timed_step = core._timed_step

    async def recording(session, step):  # type: ignore[no-untyped-def]
        out, report = await timed_step(session, step)
        outputs.setdefault(id(session), []).append(out.clone())
        return out, report

    monkeypatch.setattr(core, "_timed_step", recording)
    return outputs


def _same_bits(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_batch_invariant_replay_rebuilds_the_lost_cache_bit_for_bit(chaos, reference, monkeypatch) -> None:
    """After a kill -9, every later step's outputs equal a run without failures bit for bit, and two
    concurrent generations get the same bits as each alone (no cross-session batching)."""
    swarm, forwarding_model = chaos
    outputs = _capture_step_outputs(monkeypatch)
    rng = random.Random(6)
    with DistributedModelForCausalLM.from_pretrained(
        forwarding_model.model_path, swarm.swarm.initial_peers, batch_invariant=True
    ) as model:
        prompts = [prompt_for(140), prompt_for(141)]
        alone = []
        for prompt in prompts:
            outputs.clear()
            assert run_with_faults(model, prompt, set(), print) == reference.generate(
                prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
            alone.append(next(iter(outputs.values())))
        for generation in range(2):
            outputs.clear()

            def kill(route: list[str]) -> None:
                victim = swarm.pick_victim(route, rng)
                if victim is not None:
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(10)

            run_with_faults(model, prompts[0], {(4, 20)[generation]}, kill)  # 20: more pieces than REPLAY_WINDOW
            failures = sum(event.kind == "failure" for event in model.last_events)
            assert failures >= 1, f"generation {generation}: no kill hit the route in use"
            assert _same_bits(alone[0], next(iter(outputs.values()))), f"generation {generation}: other floats"
            swarm.heal()
        outputs.clear()
        threads = [threading.Thread(target=run_with_faults, args=(model, prompt, set(), print)) for prompt in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        together = sorted(outputs.values(), key=lambda steps: steps[0].shape[1])
        assert len(together) == 2 and all(_same_bits(*pair) for pair in zip(
            sorted(alone, key=lambda steps: steps[0].shape[1]), together, strict=True))


def test_hung_peer_sigstop(chaos, reference) -> None:
    swarm, model = chaos
    rng = random.Random(2)
    for generation in range(3):
        prompt = prompt_for(50 + generation)
        expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        stopped: list[LaunchedProcess] = []

        def freeze(route: list[str], stopped: list[LaunchedProcess] = stopped) -> None:
            victim = swarm.pick_victim(route, rng)
            if victim is not None:
                victim.process.send_signal(signal.SIGSTOP)
                stopped.append(victim)

        step = rng.randrange(2, NEW_TOKENS - 2)
        assert run_with_faults(model, prompt, {step}, freeze) == expected
        hung = [event for event in model.last_events if event.kind == "failure"]
        assert hung and all(event.detected_after_s < 3.0 for event in hung), model.last_events
        for peer in stopped:  # wake it and let it rejoin: it must keep serving afterwards
            peer.process.send_signal(signal.SIGCONT)


def test_drained_peer_sigterm_is_left_without_a_retry(chaos, reference) -> None:
    swarm, model = chaos
    rng = random.Random(3)
    for generation in range(2):
        prompt = prompt_for(80 + generation)
        expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        drained: list[tuple[LaunchedProcess, float]] = []

        def terminate(route: list[str], drained: list = drained) -> None:
            victim = swarm.pick_victim(route, rng)
            if victim is not None:
                victim.process.send_signal(signal.SIGTERM)
                drained.append((victim, time.monotonic()))

        assert run_with_faults(model, prompt, {NEW_TOKENS // 2}, terminate) == expected
        assert drained, "no peer was drained"
        assert model.last_events, "the client did not move off the leaving peer"
        assert all(event.kind == "migration" for event in model.last_events), model.last_events
        for peer, since in drained:
            peer.process.wait(15)  # it exits once its sessions moved away, well before the 20 s grace
            assert time.monotonic() - since < 15
        swarm.heal()


def test_kill_minus_9_during_speculative_decoding(chaos, reference) -> None:
    """Failover with a draft: the replacement replays inputs whose rejected positions were rolled back."""
    swarm, model = chaos
    rng = random.Random(5)
    draft = build_model("llama", seed=21, num_hidden_layers=LAYERS)  # perturbed: right sometimes, wrong sometimes
    noise = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, weight in draft.named_parameters():
            if ".layers." in name:
                weight.add_(torch.randn(weight.shape, generator=noise) * 0.02 * weight.std())
    failures = rollbacks = 0
    for generation in range(3):
        prompt = prompt_for(110 + generation)
        expected = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        kill_at = set(rng.sample(range(1, NEW_TOKENS - 1), 2))
        tokens: list[int] = []
        for index, new in enumerate(model.stream(prompt, max_new_tokens=NEW_TOKENS, draft_model=draft)):
            tokens.append(int(new[0]))
            victim = swarm.pick_victim(list(model.last_route), rng) if index in kill_at else None
            if victim is not None:
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait(10)
        assert prompt[0].tolist() + tokens == expected, f"generation {generation} diverged"
        rounds = model.last_speculation.rounds
        rollbacks += sum(later.start < earlier.start + earlier.positions for earlier, later in pairwise(rounds))
        failures += len(model.last_events)
        swarm.heal()
    assert failures >= 2 and rollbacks >= 3, (failures, rollbacks)


def test_a_dead_peer_drops_out_of_the_records(chaos) -> None:
    swarm, model = chaos
    victim = swarm.swarm.peers[-1]
    victim_id = str(victim.info["peer_id"])
    assert victim_id in {record.peer_id for record in model._loop.run(model.swarm.records(0.0))}
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    killed_at = time.monotonic()
    ttl = float(FAST_PEER_ARGS[FAST_PEER_ARGS.index("--record-ttl") + 1])
    while victim_id in {record.peer_id for record in model._loop.run(model.swarm.records(0.0))}:
        assert time.monotonic() - killed_at < ttl + 3.0, "the record outlived its expiry"
        time.sleep(0.2)
    swarm.heal()
