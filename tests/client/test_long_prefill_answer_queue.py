"""An honest long prefill through linked peers never trips the bound on a hop's answer queue.

The session reads a run's hops in turn: while it reads the first hop's receipts of a long prompt, the
last hop's full output chunks (many of them, with small prefill chunks) wait in that hop's queue. They
were asked for, so the bound (``answer_queue_limits``) must allow them however small the message cap:
only answers nobody asked for are a peer's fault. Real peers, a tiny checkpoint, a 12 KiB client cap.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS, build_checkpoint, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm

pytestmark = pytest.mark.timeout(120)

CAP = 12 * 1024  # the client's message cap: hop outputs of the prompt are ~10 times that


def test_an_honest_long_prefill_with_small_messages_and_chunks_bans_nobody(tmp_path: Path) -> None:
    checkpoint = build_checkpoint(tmp_path / "tiny-llama", "llama", seed=31)
    reference = build_model("llama", seed=31)
    prompt = torch.randint(0, 512, (1, 500), generator=torch.Generator().manual_seed(3))
    expected = reference.generate(prompt, max_new_tokens=2, do_sample=False)
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.add_peer(str(checkpoint), span, extra_args=[*FAST_PEER_ARGS, "--prefill-chunk-tokens", "8"],
                                wait=False) for span in [(0, 3), (3, 6)]]
        for peer in peers:
            swarm.wait_ready(peer)
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers, max_message_bytes=CAP,
                                                         verify_rate=0.0, retry_budget_s=20) as model:
            assert model.generate(prompt, max_new_tokens=2).tolist() == expected.tolist()
            assert not model.last_events, model.last_events
            assert not model.bans.banned()
