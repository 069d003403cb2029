"""A failover inside a generation whose rotary table changes with its length rebuilds the exact cache.

With dynamic NTK, every decode step past ``max_position_embeddings`` rotates its keys with a table of
its own (the table for the sequence's length at that step), and the prompt's keys keep the
original table. A replay that sent the whole history as one call would rotate every key with the
last table: a different cache, different tokens. The client keeps each position's call length and
the replay sends it, so the replacement peer computes what the failed one had.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from brigade_configs import NEW_TOKENS, RealConfig, build_checkpoint, prompt, reference
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm

KILL_AFTER = 14  # tokens: the sequence is past the switch (prompt ends 8 before it) when the peer dies


def test_a_peer_killed_past_the_dynamic_ntk_switch_is_replaced_with_the_same_tokens(tmp_path: Path) -> None:
    real = RealConfig.load("llama-2-7b-dynamic-ntk")
    checkpoint = build_checkpoint(real, tmp_path / "checkpoint")
    switch = real.rope_switch
    assert switch is not None and real.prompt_length() < switch < real.prompt_length() + KILL_AFTER
    ids = prompt(real)
    with torch.no_grad():
        expected = reference(checkpoint).generate(ids, attention_mask=torch.ones_like(ids),
                                                  max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(set(expected[0, ids.shape[1] :].tolist())) >= NEW_TOKENS // 3, "reference tokens must vary"
    length = real.max_length() + 8
    args = [*FAST_PEER_ARGS, "--throughput", "500", "--client-cache-share", "1", "--max-session-length", str(length),
            "--cache-tokens", str(8 * length)]
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        for span in [(0, 1), (1, 3), (1, 3)]:  # the second hop twice: one to kill, one to take over
            swarm.add_peer(str(checkpoint), span, extra_args=args, wait=False)
        for peer in swarm.peers:
            swarm.wait_ready(peer)
        by_id = {str(peer.info["peer_id"]): peer for peer in swarm.peers}
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
            tokens = []
            for step, new in enumerate(model.stream(ids, max_new_tokens=NEW_TOKENS)):
                tokens.append(int(new[0]))
                if step == KILL_AFTER:
                    victim = by_id[model.last_route[1].split("[")[0]]
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(10)
            assert ids[0].tolist() + tokens == expected[0].tolist()
            replays = [event for event in model.last_events if event.kind == "failure"]
            assert replays and replays[0].replayed_positions > switch, model.last_events


def test_a_peer_forwarding_other_rope_lengths_frames_nobody_and_changes_no_token(tmp_path: Path) -> None:
    """The first hop computes and signs honestly but forwards rope lengths off by one, so that the next
    hop computes wrongly. The next hop's attestation names the lengths it used; the client sees they are
    not its own, carries that pair itself from then on, and neither peer is banned or distrusted."""
    from brigade_evil_peer import evil_entry

    real = RealConfig.load("llama-2-7b-dynamic-ntk")
    checkpoint = build_checkpoint(real, tmp_path / "checkpoint")
    ids = prompt(real)
    with torch.no_grad():
        expected = reference(checkpoint).generate(ids, attention_mask=torch.ones_like(ids),
                                                  max_new_tokens=NEW_TOKENS, do_sample=False)
    length = real.max_length() + 8
    args = [*FAST_PEER_ARGS, "--throughput", "500", "--client-cache-share", "1", "--max-session-length", str(length),
            "--cache-tokens", str(8 * length)]
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        swarm.add_peer(str(checkpoint), (0, 1), extra_args=args, wait=False, entry=evil_entry("rope:1"))
        swarm.add_peer(str(checkpoint), (1, 3), extra_args=args, wait=False)
        for peer in swarm.peers:
            swarm.wait_ready(peer)
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
            got = model.generate(ids, max_new_tokens=NEW_TOKENS)
            assert got.tolist() == expected.tolist()
            assert [event.kind for event in model.last_events] == ["unlink"], model.last_events
            assert model.last_forwarding == [False, False]
            assert not model.distrusted and not model.bans.banned()
