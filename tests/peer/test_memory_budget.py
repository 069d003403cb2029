"""A peer given --max-memory hosts only as many layers as fit, and its resident memory stays under the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from brigade_testkit import PEER_THREADS, build_checkpoint

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.launcher import LocalSwarm

LAYERS = 48
BUDGET_MIB = 700


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read resident memory")
def test_layers_chosen_for_max_memory_fit(tmp_path: Path) -> None:
    # ~7 MB of fp32 weights per layer, ~340 MB in all: more than the budget leaves after the process itself.
    checkpoint = build_checkpoint(tmp_path / "wide", "llama", seed=9, hidden_size=384, intermediate_size=1024,
                                  num_attention_heads=6, num_key_value_heads=6, num_hidden_layers=LAYERS)
    with LocalSwarm(tmp_path / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        # One client uses this small pool alone: let it hold all of it (the default share is a quarter).
        peer = swarm.add_peer(str(checkpoint), None, extra_args=["--max-memory", f"{BUDGET_MIB}MiB",
                                                                 "--drain-grace", "1", "--client-cache-share", "1"])
        start, end = (int(x) for x in str(peer.info["layers"]).split(":"))
        assert start == 0 and 0 < end < LAYERS, "the budget should limit the span"
        plan_line = next(line for line in peer.log_path.read_text().splitlines() if line.startswith("plan:"))
        assert f"in a {BUDGET_MIB}.0 MiB budget" in plan_line, plan_line
        # Warm up: a session through the hosted layers (a client for layers 0:end only is not a thing; run
        # the peer's layers via a Forward-sized generation on a second peer covering the rest).
        swarm.add_peer(str(checkpoint), (end, LAYERS), extra_args=["--drain-grace", "1", "--cache-tokens", "4096"])
        with DistributedModelForCausalLM.from_pretrained(str(checkpoint), swarm.initial_peers) as model:
            model.generate(torch.randint(0, 512, (2, 64)), max_new_tokens=16)
            assert model.last_route[0].startswith(str(peer.info["peer_id"]))
        assert resident_mib(peer.process.pid) < BUDGET_MIB
