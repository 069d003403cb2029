"""A swarm with cheaters in it, and sessions driven through chosen routes: for result-verification
tests and ``benchmarks/verification.py``.

The embedded trained model (6 layers) split at 3, every half served several times: honest peers
in float32, bfloat16 and nf4, and in each half one cheater (real peer processes, see
``brigade_evil_peer.py``): ``a_skip`` leaves out the middle layer of 0:3, ``b_noise`` adds noise of
0.2 times the RMS of what 3:6 adds, ``b_lie`` computes 3:6 honestly but hands checks (History)
slightly altered outputs. A run is one session through a route the test picks (the
other peers are banned while it opens, then forgiven, so all of them can re-run checks), fed a
fixed token sequence (teacher forcing: the inputs do not depend on the outputs), for a number of
windows.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from brigade_evil_peer import evil_entry
from brigade_testkit import PEER_THREADS

from brigade.client import DistributedModelForCausalLM
from brigade.client.session import InferenceSession
from brigade.client.standing import PeerStanding
from brigade.client.verify.verifier import CheckResult, ResultVerifier, VerificationReport, VerificationStats
from brigade.deploy.launcher import LocalSwarm
from brigade.kernels.cache import KVCache
from brigade.kernels.default_model import DEFAULT_MODEL_DIR
from brigade.kernels.loading import load_span

MODEL = str(DEFAULT_MODEL_DIR)
NUM_LAYERS = 6
# Prefill chunks of 16 positions: re-runs and long prompts are computed (and forwarded) in several chunks.
PEER_ARGS = ["--drain-grace", "1", "--announce-period", "1.5", "--record-ttl", "4", "--throughput", "500",
             "--cache-tokens", "4096", "--prefill-chunk-tokens", "16"]


@dataclass(frozen=True)
class PeerSpec:
    name: str
    layers: tuple[int, int]
    dtype: str = "float32"
    quant: str = "none"
    cheat: str | None = None  # "noise:S" | "skip:K" (brigade_evil_peer.py)


LAYOUT = [
    PeerSpec("a32", (0, 3)),
    PeerSpec("a16", (0, 3), dtype="bfloat16"),
    PeerSpec("a_skip", (0, 3), cheat="skip:1"),
    PeerSpec("b32", (3, 6)),
    PeerSpec("b16", (3, 6), dtype="bfloat16"),
    PeerSpec("b4", (3, 6), quant="nf4"),
    PeerSpec("b_noise", (3, 6), cheat="noise:0.2"),
    PeerSpec("b_lie", (3, 6), cheat="lie:0.01"),
]
CHEATERS = {spec.name for spec in LAYOUT if spec.cheat}


class CheatSwarm:
    """The layout above as real processes: a bootstrap DHT node and one process per peer."""

    def __init__(self, folder: Path, layout: list[PeerSpec] = LAYOUT):
        self.layout = layout
        self.swarm = LocalSwarm(folder, peer_threads=PEER_THREADS)
        self.ids: dict[str, str] = {}  # name -> peer id
        self.names: dict[str, str] = {}  # peer id -> name

    def start(self) -> None:
        try:
            self.swarm.start_bootstrap()
            launched = []
            for spec in self.layout:
                args = [*PEER_ARGS, "--dtype", spec.dtype, "--quant", spec.quant]
                entry = evil_entry(spec.cheat) if spec.cheat else ("-m", "brigade")
                launched.append(self.swarm.add_peer(MODEL, spec.layers, extra_args=args, wait=False, entry=entry))
            for spec, peer in zip(self.layout, launched, strict=True):
                info = self.swarm.wait_ready(peer)
                self.ids[spec.name] = str(info["peer_id"])
            self.names = {peer_id: name for name, peer_id in self.ids.items()}
        except BaseException:
            self.swarm.close()
            raise

    def close(self) -> None:
        self.swarm.close()

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by all peer processes (what checks cost the swarm)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for peer in self.swarm.peers:
            try:
                fields = Path(f"/proc/{peer.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return total


def reference_outputs(tokens: torch.Tensor) -> torch.Tensor:
    """All 6 layers in float32 in this process, one prefill: [1, N, H] for ``tokens`` [1, N]."""
    from brigade.kernels.loading import load_head

    head = load_head(MODEL)
    span = load_span(MODEL, 0, NUM_LAYERS)
    args = span.args
    cache = KVCache.allocate(0, NUM_LAYERS, 1, args.num_kv_heads, args.head_dim, tokens.shape[1], torch.float32)
    with torch.inference_mode():
        return span(head.embed(tokens), torch.zeros(1, dtype=torch.long), cache)


@dataclass
class RunOutcome:
    route: list[str]  # names, as opened
    cheater: str | None  # the cheater on the route, if any
    caught_window: int | None  # the window whose check caught it (0-based)
    reports: list[VerificationReport]
    results: list[CheckResult]
    stats: VerificationStats
    final_route: list[str]
    last_output: torch.Tensor  # [1, H] of the last step
    step_s: list[float] = field(default_factory=list)
    positions: int = 0  # per hop
    events: list = field(default_factory=list)  # the session's FailoverEvents


async def run_session(model: DistributedModelForCausalLM, swarm: CheatSwarm, route: list[str], tokens: torch.Tensor,
                      prompt: int, window: int, *, verify: bool = True, seed: int | None = None,
                      drain_s: float = 60.0, stop_when_caught: bool = False,
                      distrust: tuple[str, ...] = ()) -> RunOutcome:
    """One session over ``route`` (names) feeding ``tokens`` [1, N]: a prompt, then one token per step.

    ``window`` is the client's ``verify_window`` (to turn a report's positions into a window index).
    ``stop_when_caught``: end the session once the route's cheater is dropped. ``distrust``: names
    the session avoids from the start (as if already caught).
    """
    standing = PeerStanding(model.bans)  # this run's verdicts only; the bans steer the route (shared)
    standing.distrusted.update(swarm.ids[name] for name in distrust)
    session = InferenceSession(model.swarm, standing, 1, tokens.shape[1], [0])
    verifier = ResultVerifier.attach(session, random.Random(seed)) if verify else None
    others = [peer_id for name, peer_id in swarm.ids.items() if name not in route]
    for peer_id in others:  # the route the test asked for; afterwards every peer may re-run checks
        model.bans.ban(peer_id)
    try:
        await session.open()
    finally:
        for peer_id in others:
            model.bans.forgive(peer_id)
    opened = [swarm.names[hop.peer.peer_id] for hop in session.route]
    cheater = next((name for name in opened if name in CHEATERS), None)
    step_s = []
    try:
        output = await session.step(model.head.embed(tokens[:, :prompt]))
        for position in range(prompt, tokens.shape[1]):
            began = time.perf_counter()
            output = await session.step(model.head.embed(tokens[:, position : position + 1]))
            step_s.append(time.perf_counter() - began)
            if stop_when_caught and cheater is not None and swarm.ids[cheater] in standing.distrusted:
                break
        if verifier is not None:
            await verifier.drain(drain_s)
        final_route = [swarm.names[hop.peer.peer_id] for hop in session.route]
    finally:
        await session.close()
    caught = None
    if cheater is not None:
        for report in standing.reports:
            if swarm.ids[cheater] in report.accused:
                index = (report.window[1] - prompt + 1) // window - 1
                caught = index if caught is None else min(caught, index)
    return RunOutcome(
        route=opened, cheater=cheater, caught_window=caught, reports=list(standing.reports),
        results=list(verifier.results) if verifier else [], stats=verifier.stats if verifier else VerificationStats(),
        final_route=final_route, last_output=output[:, -1],
        step_s=step_s, positions=prompt + len(step_s), events=list(session.events),
    )
