"""Balance on a real swarm (bootstrap DHT + peer processes on loopback, the tiny Llama checkpoint):

- two chains over the same layers, one behind delay proxies adding 5 ms each way per hop and one
  adding 60 ms; the peers announce the proxies' addresses. The client's session takes the fast
  chain (from its own pings) and its ms/token shows it; forced onto the slow chain it is ~10x
  slower. Each peer's record carries its measured round trips to the next layers' peers.
- a layer gap appears mid-generation (a peer is killed) and a peer that doubled other layers
  moves to fill it: drain, reload, announce. The client's session migrates off the moving peer
  like off a leaving one, and its tokens are still exactly transformers'.
"""

from __future__ import annotations

import gc
import itertools
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from brigade_testkit import PEER_THREADS, build_model

from brigade.client import DistributedModelForCausalLM
from brigade.deploy.delay_proxy import LinkProfile, ProxyThread
from brigade.deploy.launcher import LaunchedProcess, LocalSwarm
from brigade.protocol.records import PeerRecord
from brigade.routing.route import RouteCosts, find_route

# Short periods so the scenario fits in seconds: announce every 1.5 s (records live 4 s).
PEER_ARGS = ["--drain-grace", "1", "--announce-period", "1.5", "--record-ttl", "4", "--throughput-cache", ""]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


def records_of(model: DistributedModelForCausalLM) -> list[PeerRecord]:
    return model._loop.run(model.swarm.records(0.0))


def ms_per_token(model: DistributedModelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and the median ms between decode steps (the prefill's first token left out)."""
    stamps, tokens = [], []
    for new in model.stream(prompt, max_new_tokens=new_tokens):
        stamps.append(time.perf_counter())
        tokens.append(int(new[0]))
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    return prompt[0].tolist() + tokens, statistics.median(gaps)


def test_session_takes_the_fast_chain(llama_checkpoint: Path, tmp_path: Path) -> None:
    swarm = LocalSwarm(tmp_path / "logs", peer_threads=PEER_THREADS)
    proxies: list[ProxyThread] = []
    try:
        swarm.start_bootstrap()
        chains = {"fast": 5.0, "slow": 60.0}  # one-way delay per direction: 10 and 120 ms round trips per hop
        launched: dict[str, LaunchedProcess] = {}
        for chain, delay_ms in chains.items():
            for half, layers in enumerate([(0, 3), (3, 6)]):
                port = free_port()
                proxy = ProxyThread(f"127.0.0.1:{port}", LinkProfile(delay_ms=delay_ms)).start()
                proxies.append(proxy)
                args = [*PEER_ARGS, "--port", str(port), "--announce-port", str(proxy.proxy.listen_port),
                        "--throughput", "1000", "--ping-period", "1", "--rebalance-period", "0"]
                launched[f"{chain}{half}"] = swarm.add_peer(str(llama_checkpoint), layers, extra_args=args, wait=False)
        ids = {name: str(swarm.wait_ready(peer)["peer_id"]) for name, peer in launched.items()}
        names = {peer_id: name for name, peer_id in ids.items()}

        with DistributedModelForCausalLM.from_pretrained(str(llama_checkpoint), swarm.initial_peers,
                                                         ban_base_s=600.0, ban_max_s=600.0) as model:
            # The first half's peers measure their round trips to both peers of layer 3 and announce them.
            def pings_announced() -> bool:
                by_id = {r.peer_id: r for r in records_of(model)}
                return all(len(by_id[ids[f"{chain}0"]].pings) == 2 for chain in chains if ids[f"{chain}0"] in by_id)

            wait_for(pings_announced, 60, "the first-half peers to announce round trips to both second-half peers")
            records = records_of(model)
            fast0 = next(r for r in records if r.peer_id == ids["fast0"])
            assert fast0.pings[ids["fast1"]] < 60 < fast0.pings[ids["slow1"]], fast0.pings

            prompt = torch.arange(3, 11)[None]
            expected = build_model("llama", seed=0).generate(prompt, max_new_tokens=12, do_sample=False)[0].tolist()
            tokens, fast_ms = ms_per_token(model, prompt, 12)
            route = [names[hop.split("[")[0]] for hop in model.last_route]
            assert tokens == expected
            assert route == ["fast0", "fast1"], route

            # The same session forced onto the slow chain (the fast peers banned): the difference shows.
            for name in ("fast0", "fast1"):
                model.bans.ban(ids[name])
            tokens, slow_ms = ms_per_token(model, prompt, 6)
            slow_route = [names[hop.split("[")[0]] for hop in model.last_route]
            assert tokens == expected[: len(tokens)] and slow_route == ["slow0", "slow1"], slow_route
            # With peer-to-peer forwarding the peers' own announced round trips would choose the same.
            forwarded = find_route(records, 0, 6, costs=RouteCosts(forwarding=True))
            print(f"\nms/token: fast chain {fast_ms:.1f} (route {route}), slow chain {slow_ms:.1f} "
                  f"(route {slow_route}); fast0's announced round trips: {{fast1: {fast0.pings[ids['fast1']]:.1f} ms, "
                  f"slow1: {fast0.pings[ids['slow1']]:.1f} ms}}; forwarding route from the peers' pings alone: "
                  f"{[names[hop.peer.peer_id] for hop in forwarded]}")
            assert fast_ms < 120 < slow_ms  # two hops: floors of 20 and 240 ms of round trips
            assert [names[hop.peer.peer_id] for hop in forwarded][1] == "fast1"
    finally:
        swarm.close()
        for proxy in proxies:
            proxy.close()
        gc.collect()  # collect this test's gRPC objects here, not in the child of a later fork (hivemind's DHT)


def test_a_peer_moves_to_fill_a_gap_and_sessions_follow(llama_checkpoint: Path, tmp_path: Path) -> None:
    swarm = LocalSwarm(tmp_path / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        fixed = [*PEER_ARGS, "--ping-period", "0"]
        slow = swarm.add_peer(str(llama_checkpoint), (0, 3), extra_args=[*fixed, "--throughput", "50"], wait=False)
        second = swarm.add_peer(str(llama_checkpoint), (3, 6), extra_args=[*fixed, "--throughput", "5000"], wait=False)
        ids = {"slow": str(swarm.wait_ready(slow)["peer_id"]), "second": str(swarm.wait_ready(second)["peer_id"])}
        # The auto peer doubles the weak first half (the slow peer's), where it helps most.
        mover = swarm.add_peer(str(llama_checkpoint), None, extra_args=[
            *fixed, "--throughput", "5000", "--num-layers", "3", "--rebalance-period", "1", "--move-drain", "2"])
        assert mover.info["layers"] == "0:3", mover.info
        ids["mover"] = str(mover.info["peer_id"])
        names = {peer_id: name for name, peer_id in ids.items()}

        prompt = torch.arange(5, 14)[None]
        new_tokens = 16
        expected = build_model("llama", seed=0).generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        with DistributedModelForCausalLM.from_pretrained(str(llama_checkpoint), swarm.initial_peers) as model:
            tokens = []
            began = time.monotonic()
            for step, new in enumerate(model.stream(prompt, max_new_tokens=new_tokens)):
                tokens.append(int(new[0]))
                if step == 0:
                    route = [names[hop.split("[")[0]] for hop in model.last_route]
                    assert route == ["mover", "second"], route  # the client prefers the fast doubling peer
                    second.kill()  # layers 3:6 now have no peer: the mover should come and fill them
            elapsed = time.monotonic() - began
            assert prompt[0].tolist() + tokens == expected[0].tolist()
            events = [(event.kind, names.get(event.peer_id), event.layers, [names.get(hop.split("[")[0], hop)
                                                                               for hop in event.new_route])
                      for event in model.last_events]
            final = {r.peer_id: (r.start_layer, r.end_layer, r.state) for r in records_of(model)}
        print(f"\nrecoveries: {events}; {new_tokens} tokens in {elapsed:.1f} s")
        assert ("failure", "second", (3, 6), ["mover"]) in events  # waited for the move, then replayed there
        assert ("migration", "mover", (0, 3), ["slow"]) in events  # the moving peer's old session moved away
        assert final[ids["mover"]] == (3, 6, "online")
        assert "moved from layers 0:3 to 3:6" in mover.log_path.read_text()
    finally:
        swarm.close()
        gc.collect()
