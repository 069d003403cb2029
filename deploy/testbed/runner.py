"""A swarm on the testbed: a bootstrap host, one host per peer, a client host, and their links.

Every host has its own address and port space, so every peer uses the same well-known ports,
as it would on its own machine. A peer binds its gRPC port on its own loopback and a delay proxy
on its public address forwards to it: clients can only reach the peer through the link's delay.
With netem (where the kernel has it) the kernel delays the link instead and the peer binds its
public address itself.

``close`` is idempotent and runs however ``start`` or the generation ended (an error, Ctrl-C,
SIGTERM): it stops the processes, then deletes the namespaces, which also kills anything left in
them and removes every link, bridge and queue.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from brigade.deploy.launcher import DHT_READY
from brigade.deploy.testbed.client import FORWARDING_MODES, PROGRESS_MARK, RESULT_MARK
from brigade.deploy.testbed.homes import Home, build_home, plan_home
from brigade.deploy.testbed.netns import Host, Network, new_run_id, plan_hosts, sweep_stale
from brigade.deploy.testbed.processes import HostProcess, spawn, stop_all
from brigade.deploy.testbed.profiles import NetProfile, get_profile

logger = logging.getLogger(__name__)

PEER_PORT = 31330  # what clients dial on every peer host (the proxy, or the peer itself under netem)
BACKEND_PORT = 31331  # the peer's own gRPC port behind the proxy, on the host's loopback
DHT_PORT = 31337  # every host's DHT node
RELAY_PORT = 31332  # what relayed peers' clients dial on a relay host (the proxy, or the relay port itself)
RELAY_BACKEND_PORT = 31333  # the relay port behind its proxy, on the host's loopback
PROXY_READY = "BRIGADE_PROXY_READY"


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False

    model: str  # checkpoint folder every host reads (the hosts share this machine's file system)
    spans: tuple[tuple[int, int], ...]  # one peer host per span, half-open [start, end)
    profile: str = "internet"  # lan | internet | bad (see profiles.py)
    seed: int = 0  # draws each peer's round trip within the profile's range
    rtt_ms: float | None = None  # every peer's round trip, instead of the profile's range (benchmarks)
    emulation: str = "auto"  # auto (netem where the kernel has it) | proxy | netem
    subnet: str = "10.77.0"  # first three octets of the testbed's private /24 (inside its namespaces only)
    peer_threads: int = 1  # torch threads per peer
    peer_args: tuple[str, ...] = ("--drain-grace", "1")  # more `brigade peer run` flags for every peer
    log_dir: str | None = None  # where each process logs; a fresh temporary folder when None
    home_peers: tuple[int, ...] = ()  # peers (by index) behind a home router each: NAT, nothing connects in
    relays: tuple[int, ...] = ()  # peers (by index) that relay for unreachable ones (--relay)
    start_timeout_s: float = 180.0  # bound on the bootstrap and on all peers becoming ready
    generate_timeout_s: float = 300.0  # bound on one client run


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    token_times_s: list[float]
    route: list[str]  # peer ids with spans, as the client reported them
    hops: list[Host] = field(default_factory=list)  # the hosts those peers live on, in route order
    mode: str = "forwarding"  # how tokens travelled (``client.MODES``)
    speculation: dict[str, float] | None = None  # the speculative mode's acceptance and steps
    compute_ms: float | None = None  # the peers' compute per token, as the client measured it

    @property
    def first_token_ms(self) -> float:
        return 1000 * self.token_times_s[0] if self.token_times_s else float("nan")

    @property
    def step_ms(self) -> list[float]:
        """Decode steps after the first token (the first one also pays for the prefill)."""
        times = self.token_times_s
        return [1000 * (later - earlier) for earlier, later in itertools.pairwise(times)]

    @property
    def ms_per_token(self) -> float:
        steps = self.step_ms
        return statistics.fmean(steps) if steps else float("nan")

    @property
    def floor_ms(self) -> float:
        """What no decode step through this route can beat: one round trip per hop when the client
        calls each hop; one way into each hop plus one way back from the last when peers forward."""
        if not self.hops:
            return 0.0
        if self.mode in FORWARDING_MODES:
            return sum(host.rtt_ms for host in self.hops) / 2 + self.hops[-1].rtt_ms / 2
        return sum(host.rtt_ms for host in self.hops)

    def describe_route(self) -> str:
        parts = []
        for hop, host in zip(self.route, self.hops, strict=False):
            span = hop[hop.index("[") :] if "[" in hop else ""
            parts.append(f"{host.role}{span} {host.address} (rtt {host.rtt_ms:g} ms)")
        return " -> ".join(parts) if parts else " -> ".join(self.route)


class Testbed:
    """Hosts, links and processes of one run. ``start`` builds everything; ``close`` removes it all."""

    __test__ = False

    def __init__(self, config: TestbedConfig):
        if not config.spans:
            raise ValueError("a testbed needs at least one peer span")
        self.config = config
        self.profile: NetProfile = get_profile(config.profile)
        self.run_id = new_run_id()
        self.log_dir = Path(config.log_dir) if config.log_dir else None
        rtts = ([config.rtt_ms] * len(config.spans) if config.rtt_ms is not None
                else self.profile.hop_rtts(len(config.spans), config.seed))
        # A peer at home is role pN behind a router rN on the bridge; the router carries the home's link.
        on_bridge = [f"r{i}" if i in config.home_peers else f"p{i}" for i in range(len(config.spans))]
        roles = ["boot", *on_bridge, "client"]
        self.hosts = plan_hosts(self.run_id, roles, dict(zip(on_bridge, rtts, strict=True)), config.subnet)
        self.network = Network(self.run_id, list(self.hosts), self.profile, emulation=config.emulation)
        self.homes: list[Home] = [plan_home(self._bridge_host(f"r{i}"), f"p{i}", n, self.run_id)
                                  for n, i in enumerate(sorted(set(config.home_peers)))]
        self.hosts += [home.host for home in self.homes]
        self.network.extra_namespaces += [home.host.namespace for home in self.homes]
        self.processes: list[HostProcess] = []
        self.peers: list[HostProcess] = []
        self.initial_peers: list[str] = []
        self._closed = False

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> Testbed:
        """Builds the network and starts every process; on any failure removes what it made and raises."""
        try:
            with _signals_as_interrupts():
                self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        removed = sweep_stale()
        if removed:
            logger.warning("removed %d leftover namespaces of earlier testbed runs", len(removed))
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="brigade-testbed-"))
        self.network.create()
        for home in self.homes:
            build_home(home)
        boot = self.network.host("boot")
        bootstrap = self._spawn(boot, "bootstrap", ["-m", "brigade", "dht", "--listen",
                                                    f"/ip4/{boot.address}/tcp/{DHT_PORT}"])
        info = bootstrap.wait_ready(DHT_READY, self.config.start_timeout_s)
        self.initial_peers = [str(maddr) for maddr in info["maddrs"]]  # type: ignore[union-attr]
        proxies = [] if self.network.netem else [self._start_proxy(host) for host in self._peer_hosts()]
        if not self.network.netem:
            proxies += [self._start_proxy(self._peer_hosts()[i], RELAY_BACKEND_PORT, RELAY_PORT, "relay")
                        for i in sorted(set(self.config.relays))]
        # Peers at home join a running swarm, as volunteers do: they need others to check their
        # reachability and to relay for them.
        homes = {home.host.role for home in self.homes}
        starts = {host.role: (host, span) for host, span in zip(self._peer_hosts(), self.config.spans, strict=True)}
        launched: dict[str, HostProcess] = {}
        for proxy in proxies:
            proxy.wait_ready(PROXY_READY, self.config.start_timeout_s)
        for batch in ([role for role in starts if role not in homes], [role for role in starts if role in homes]):
            for role in batch:
                launched[role] = self._start_peer(*starts[role])
            for role in batch:
                launched[role].wait_ready_file(self.config.start_timeout_s)
        self.peers = [launched[host.role] for host in self._peer_hosts()]
        logger.info("testbed %s ready: %d peers, logs in %s", self.run_id, len(self.peers), self.log_dir)

    def _peer_hosts(self) -> list[Host]:
        """The host of each peer, in span order (a home peer's is its host behind the router)."""
        by_role = {host.role: host for host in self.hosts}
        return [by_role[f"p{index}"] for index in range(len(self.config.spans))]

    def _bridge_host(self, role: str) -> Host:
        return next(host for host in self.hosts if host.role == role)

    def home_of(self, index: int) -> Home | None:
        """The home (router and host) of peer ``index``, or None when it is on the bridge itself."""
        return next((home for home in self.homes if home.host.role == f"p{index}"), None)

    def _spawn(self, host: Host, name: str, args: list[str], threads: int | None = None) -> HostProcess:
        assert self.log_dir is not None
        launched = spawn(host, name, args, self.log_dir, threads)
        self.processes.append(launched)
        return launched

    def _start_proxy(self, host: Host, backend: int = BACKEND_PORT, port: int = PEER_PORT,
                     kind: str = "proxy") -> HostProcess:
        link = self.profile.link(host.rtt_ms)
        return self._spawn(host, f"{kind}-{host.role}", [
            "-m", "brigade.deploy.delay_proxy", f"127.0.0.1:{backend}",
            "--listen", f"{host.address}:{port}",
            "--delay-ms", f"{link.delay_ms:g}", "--jitter-ms", f"{link.jitter_ms:g}",
            "--stall-rate", f"{link.stall_rate_per_s:g}", "--stall-ms", f"{link.stall_ms:g}",
        ])

    def _start_peer(self, host: Host, span: tuple[int, int]) -> HostProcess:
        index = int(host.role[1:])
        home = self.home_of(index)
        # A volunteer at home announces the router's public address but forwarded no port: probes
        # really dial it and get nothing.
        public = home.router.address if home is not None else host.address
        if self.network.netem:
            bind = ["--host", host.address, "--port", str(PEER_PORT), "--announce-host", public]
        else:
            bind = ["--host", "127.0.0.1", "--port", str(BACKEND_PORT),
                    "--announce-host", public, "--announce-port", str(PEER_PORT)]
            if home is not None:  # relayed connections come in through the home's own (delayed) link
                bind += ["--relayed-backend", f"{host.address}:{PEER_PORT}"]
        if index in self.config.relays:
            bind += (["--relay", "--relay-port", str(RELAY_PORT)] if self.network.netem else
                     ["--relay", "--relay-port", str(RELAY_BACKEND_PORT), "--relay-announce-port", str(RELAY_PORT)])
        args = ["-m", "brigade", "peer", "run", self.config.model, "--layers", f"{span[0]}:{span[1]}",
                *bind, "--dht-listen", f"/ip4/{host.address}/tcp/{DHT_PORT}",
                "--num-threads", str(self.config.peer_threads), *self.config.peer_args]
        for maddr in self.initial_peers:
            args += ["--initial-peers", maddr]
        assert self.log_dir is not None
        ready_file = self.log_dir / f"peer-{host.role}.ready.json"  # the hosts share this file system
        launched = self._spawn(host, f"peer-{host.role}", [*args, "--ready-file", str(ready_file)],
                               self.config.peer_threads)
        launched.ready_file = ready_file
        return launched

    # -- generate ------------------------------------------------------------------------------
    def generate(self, *, prompt_ids: list[int] | None = None, prompt: str | None = None, new_tokens: int = 16,
                 mode: str = "forwarding", draft_model: str | None = None) -> GenerationResult:
        """Runs the client on the client host once and returns its tokens, timings and route."""
        client = self.start_generation(prompt_ids=prompt_ids, prompt=prompt, new_tokens=new_tokens, mode=mode,
                                       draft_model=draft_model)
        return self.finish_generation(client)

    def start_generation(self, *, prompt_ids: list[int] | None = None, prompt: str | None = None,
                         new_tokens: int = 16, mode: str = "forwarding",
                         draft_model: str | None = None) -> HostProcess:
        """Starts the client and returns at once; it logs a progress line per token (``tokens_so_far``)."""
        if not self.peers:
            raise RuntimeError("start the testbed first")
        args = ["-m", "brigade.deploy.testbed.client", self.config.model, "--new-tokens", str(new_tokens),
                "--mode", mode, "--progress"]
        if draft_model is not None:
            args += ["--draft-model", draft_model]
        if prompt_ids is not None:
            args += ["--prompt-ids", ",".join(str(token) for token in prompt_ids)]
        elif prompt is not None:
            args += ["--prompt", prompt]
        else:
            raise ValueError("give prompt_ids or prompt")
        for maddr in self.initial_peers:
            args += ["--initial-peers", maddr]
        return self._spawn(self.network.host("client"), f"client-{len(self.processes)}", args)

    @staticmethod
    def tokens_so_far(client: HostProcess) -> int:
        """How many tokens a running client has produced (from its progress lines)."""
        text = client.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if line.startswith(PROGRESS_MARK + " "))

    def finish_generation(self, client: HostProcess) -> GenerationResult:
        """Waits for a client from ``start_generation`` (bounded) and returns its result."""
        with _signals_as_interrupts():
            try:
                client.process.wait(self.config.generate_timeout_s)
            except subprocess.TimeoutExpired:
                client.kill()
                raise TimeoutError(f"the client did not finish within {self.config.generate_timeout_s:.0f} s:\n"
                                   f"{client.log_tail()}") from None
        lines = [line for line in client.log_path.read_text(errors="replace").splitlines()
                 if line.startswith(RESULT_MARK + " ")]
        if client.process.returncode != 0 or not lines:
            raise RuntimeError(f"the client failed (exit {client.process.returncode}):\n{client.log_tail()}")
        data = json.loads(lines[-1][len(RESULT_MARK) + 1 :])
        result = GenerationResult(data["prompt_ids"], data["tokens"], data["token_times_s"], data["route"],
                                  mode=data.get("mode", "forwarding"), speculation=data.get("speculation"),
                                  compute_ms=data.get("compute_ms"))
        by_peer_id = {str(peer.info.get("peer_id")): peer.host for peer in self.peers}
        result.hops = [by_peer_id[hop.split("[")[0]] for hop in result.route if hop.split("[")[0] in by_peer_id]
        return result

    # -- close ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops every process and deletes every namespace; safe to call twice, and under Ctrl-C."""
        if self._closed:
            return
        with _signals_deferred():
            stop_all(self.processes)
            self.network.close()
            self._closed = True

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C, so ``close`` runs for both (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Cleanup is not cut short by a second Ctrl-C; the signal arrives once it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
