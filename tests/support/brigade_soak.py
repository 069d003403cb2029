"""The soak benchmark's swarm (benchmarks/soak.py): ChaosSwarm's peers and healing, plus the faults it
rotates through and the figures its leak check reads.

A stopped (SIGSTOP) or draining peer still has a live process, so ChaosSwarm would count it as
covering its layers; here such a peer is "impaired" and does not count, so that no second fault
takes the last copy of a layer while one of them is out.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from brigade_peer_client import peer_stub
from brigade_testkit import ChaosSwarm

from brigade.deploy.launcher import LaunchedProcess
from brigade.peer.config import PeerConfig
from brigade.protocol import brigade_pb2 as pb

PAGE_TOKENS = PeerConfig.cache_page_tokens  # the peers run with the default page size
DRAIN_EXIT_S = 40.0  # a drained peer must have exited this long after SIGTERM (its grace is 20 s)


@dataclass(frozen=True)
class Usage:
    """What one peer process holds at one moment: from /proc, and from its Info reply when asked."""

    pid: int
    rss_mib: float
    threads: int
    fds: int
    sessions: int = -1  # -1: Info not asked
    used_pages: int = -1
    tasks: int = -1
    state: str = ""


def proc_usage(pid: int) -> Usage | None:
    """RSS, thread and open-file counts of ``pid`` from /proc; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return Usage(pid, rss_kib / 1024, threads, fds)


def peer_usage(peer: LaunchedProcess) -> Usage | None:
    """``proc_usage`` plus the peer's own count of sessions, cache pages in use and event-loop tasks.

    The Info call comes first so that its channel is closed again before the fds are counted.
    """
    channel, stub = peer_stub(peer.info)
    with channel:
        info = stub.Info(pb.InfoRequest(), timeout=10)
    usage = proc_usage(peer.process.pid)
    if usage is None:
        return None
    used = info.cache_tokens - info.free_cache_tokens
    return Usage(usage.pid, usage.rss_mib, usage.threads, usage.fds, info.open_sessions,
                 -(-used // PAGE_TOKENS), info.asyncio_tasks - 1, info.state)  # less the Info call's own task


class SoakSwarm(ChaosSwarm):
    """ChaosSwarm on a given layout, with kill / stop / drain / restart faults and per-incarnation baselines."""

    def __init__(self, folder: Path, checkpoint: Path, spans: list[tuple[int, int]], peer_args: list[str]):
        super().__init__(folder, checkpoint, max(end for _, end in spans), peer_args)
        self.spans = spans
        self._impaired: dict[str, str] = {}  # peer name -> "stopped" | "draining"
        self._lock = threading.Lock()
        self.baselines: dict[str, Usage] = {}  # peer name -> its current incarnation's usage once ready
        self.hung_drains: list[str] = []  # peers that had not exited DRAIN_EXIT_S after SIGTERM

    def label(self, peer: LaunchedProcess) -> str:
        start, end = self.spans[self.swarm.peers.index(peer)]
        return f"p{self.swarm.peers.index(peer)}[{start}:{end})"

    def start(self) -> None:
        super().start()
        for peer in self.swarm.peers:
            self._baseline(peer)

    def alive_spans(self, without: LaunchedProcess | None = None) -> list[tuple[int, int]]:
        with self._lock:
            impaired = set(self._impaired)
        return [span for peer, span in zip(self.swarm.peers, self.spans, strict=True)
                if peer.alive() and peer is not without and peer.name not in impaired]

    def status(self, peer: LaunchedProcess) -> str:
        """"up", "stopped", "draining" or "down"."""
        with self._lock:
            impaired = self._impaired.get(peer.name)
        return impaired or ("up" if peer.alive() else "down")

    def _victim(self, rng: random.Random) -> LaunchedProcess | None:
        candidates = [peer for peer in self.swarm.peers if self.status(peer) == "up" and self.removable(peer)]
        return rng.choice(candidates) if candidates else None

    def fault(self, action: str, rng: random.Random, stop_s: float, shutdown: threading.Event) -> str:
        """Applies one fault and says what it did; "stop" returns after the peer was woken again."""
        if action == "restart":
            return self.restart_all()
        victim = self._victim(rng)
        if victim is None:
            return "no peer can go without leaving a layer uncovered"
        if action == "kill":
            victim.kill(signal.SIGKILL)  # the whole group: hivemind's DHT child and p2pd die with it
        elif action == "drain":
            with self._lock:
                self._impaired[victim.name] = "draining"
            victim.process.send_signal(signal.SIGTERM)
        elif action == "stop":
            with self._lock:
                self._impaired[victim.name] = "stopped"
            victim.kill(signal.SIGSTOP)
            shutdown.wait(stop_s)
            victim.kill(signal.SIGCONT)
            with self._lock:
                del self._impaired[victim.name]
        else:
            raise ValueError(f"unknown fault {action!r}")
        return self.label(victim)

    def restart_all(self) -> str:
        """Waits out draining peers, then restarts every peer that is down (same identity) and baselines it."""
        with self._lock:
            draining = [peer for peer in self.swarm.peers if self._impaired.get(peer.name) == "draining"]
        for peer in draining:
            try:
                peer.process.wait(DRAIN_EXIT_S)
            except subprocess.TimeoutExpired:
                self.hung_drains.append(self.label(peer))
                peer.kill(signal.SIGKILL)
            with self._lock:
                del self._impaired[peer.name]
        down = [peer for peer in self.swarm.peers if not peer.alive()]
        self.heal()
        for peer in down:
            self._baseline(peer)
        return ", ".join(self.label(peer) for peer in down) or "nothing was down"

    def _baseline(self, peer: LaunchedProcess) -> None:
        usage = peer_usage(peer)
        if usage is not None:
            self.baselines[peer.name] = usage

    def stale_groups(self) -> list[str]:
        """Processes left in earlier incarnations' groups (a DHT child or p2pd that outlived its peer)."""
        earlier = {group: peer for peer in self.swarm.peers for group in peer.groups[:-1]}
        stale = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
            except OSError:
                continue
            state, group = fields[0], int(fields[2])
            if group in earlier and state != "Z":  # a zombie holds nothing; PID 1 may be slow to reap it
                stale.append(f"{self.label(earlier[group])}: pid {stat.parent.name} of group {group}")
        return stale

def wait_until(deadline: float, shutdown: threading.Event | None = None) -> bool:
    """Sleeps until ``deadline`` (monotonic); False when ``shutdown`` was set first."""
    remaining = deadline - time.monotonic()
    if shutdown is None:
        time.sleep(max(0.0, remaining))
        return True
    return not shutdown.wait(max(0.0, remaining))


def dump_stuck(threads: list, models: list) -> None:
    """Prints where each stuck client thread waits and every pending task of its client's event loop:
    a generation that outlives the run names the wait that is not bounded."""
    import asyncio
    import traceback

    frames = sys._current_frames()
    for thread in threads:
        frame = frames.get(thread.ident)
        print(f"--- stuck thread {thread.name}:", flush=True)
        if frame is not None:
            print("".join(traceback.format_stack(frame)), flush=True)
    for index, model in enumerate(models):
        loop_thread = model._loop._thread  # a loop blocked in a call (not awaiting) shows only here
        frame = frames.get(loop_thread.ident)
        if frame is not None:
            print(f"--- client {index} loop thread:", flush=True)
            print("".join(traceback.format_stack(frame)), flush=True)
        loop = model._loop.loop
        for task in asyncio.all_tasks(loop):
            print(f"--- client {index} task {task.get_name()}:", flush=True)
            for frame in task.get_stack(limit=12):
                print("".join(traceback.format_stack(frame, limit=1)), end="", flush=True)
