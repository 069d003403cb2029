"""Starting a local swarm in separate processes: a bootstrap DHT node and peers on 127.0.0.1.

The demo, benchmarks and test fixtures use this; each process writes to its own log file. A peer
is ready when it has written its ready file (``--ready-file``: JSON, written atomically once it
serves and is announced); the bootstrap node when its log shows its ready line. Every wait is
bounded and ``close`` stops everything it started, even when a start failed half-way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from brigade.routing.cli import READY_MARK

logger = logging.getLogger(__name__)

DHT_READY = READY_MARK  # printed by `brigade dht` (routing/cli.py)
READY_POLL_S = 0.05  # how often a wait for a ready file or line looks again


def wait_for_ready_file(path: Path, alive: Callable[[], bool], timeout_s: float, name: str,
                        log_tail: Callable[[], str]) -> dict[str, object]:
    """The JSON a peer wrote to ``path`` once ready; raises when the process exits first or the time is up.

    The peer writes the file atomically (a rename), so a file that exists is whole.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            pass
        if not alive():
            raise RuntimeError(f"{name} exited early:\n{log_tail()}")
        time.sleep(READY_POLL_S)
    raise TimeoutError(f"{name} was not ready within {timeout_s:.0f} s:\n{log_tail()}")


@dataclass
class LaunchedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str]
    threads: int | None = None
    info: dict[str, object] = field(default_factory=dict)
    # Every process group this entry ever ran: a killed peer's forked children (hivemind's DHT
    # process and its p2pd daemon) outlive it in its old group, and must still be stopped.
    groups: list[int] = field(default_factory=list)
    entry: tuple[str, ...] = ("-m", "brigade")  # what the interpreter runs before ``args``
    ready_file: Path | None = None  # where a peer writes its ready JSON (``--ready-file``); None for the bootstrap

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the whole process group, as when the machine itself dies or hangs."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None


def _child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    # Idle OpenMP workers must sleep, not spin: peers of one machine take turns on the same cores.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class LocalSwarm:
    """A bootstrap node plus peers, each its own ``python -m brigade ...`` process."""

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, peer_threads: int | None = None):
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="brigade-swarm-"))
        self.peer_threads = peer_threads
        self.bootstrap: LaunchedProcess | None = None
        self.peers: list[LaunchedProcess] = []
        self.initial_peers: list[str] = []

    def _spawn(self, name: str, args: list[str], threads: int | None = None,
               entry: tuple[str, ...] = ("-m", "brigade")) -> LaunchedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "wb")
        process = subprocess.Popen(
            [sys.executable, *entry, *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_child_env(threads),
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop children in order
        )
        log_file.close()
        return LaunchedProcess(name, process, log_path, args, threads, groups=[process.pid], entry=entry)

    def _wait_for_line(self, launched: LaunchedProcess, mark: str, timeout_s: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = launched.log_path.read_text(errors="replace").split("--- restarted ---")[-1].splitlines()
            for line in lines:
                if line.startswith(mark + " "):
                    launched.info = json.loads(line[len(mark) + 1 :])
                    return launched.info
            if not launched.alive():
                raise RuntimeError(f"{launched.name} exited early:\n{launched.log_tail()}")
            time.sleep(READY_POLL_S)
        raise TimeoutError(f"{launched.name} was not ready within {timeout_s:.0f} s:\n{launched.log_tail()}")

    def start_bootstrap(self, timeout_s: float = 60.0) -> list[str]:
        self.bootstrap = self._spawn("bootstrap", ["dht"])
        info = self._wait_for_line(self.bootstrap, DHT_READY, timeout_s)
        self.initial_peers = list(info["maddrs"])  # type: ignore[arg-type]
        return self.initial_peers

    def add_peer(
        self,
        model: str,
        layers: tuple[int, int] | None,
        *,
        extra_args: list[str] | None = None,
        wait: bool = True,
        timeout_s: float = 120.0,
        entry: tuple[str, ...] = ("-m", "brigade"),
    ) -> LaunchedProcess:
        """Starts a peer hosting ``layers`` of ``model`` (None: auto); waits for its ready file unless told not to.

        ``entry`` replaces ``-m brigade`` on the command line: a wrapper that takes the same arguments
        (tests run misbehaving peers this way).
        """
        if not self.initial_peers:
            raise RuntimeError("start the bootstrap node first")
        span = "auto" if layers is None else f"{layers[0]}:{layers[1]}"
        args = ["peer", "run", model, "--layers", span]
        for maddr in self.initial_peers:
            args += ["--initial-peers", maddr]
        if self.peer_threads:
            args += ["--num-threads", str(self.peer_threads)]
        name = f"peer{len(self.peers)}-{span.replace(':', '-')}"
        ready_file = self.log_dir / f"{name}.ready.json"
        args += ["--ready-file", str(ready_file), *(extra_args or [])]
        launched = self._spawn(name, args, self.peer_threads, entry)
        launched.ready_file = ready_file
        self.peers.append(launched)
        if wait:
            self.wait_ready(launched, timeout_s)
        return launched

    def wait_ready(self, launched: LaunchedProcess, timeout_s: float = 120.0) -> dict[str, object]:
        """What a peer wrote to its ready file (its id, address, span, certificate, ...) once it serves."""
        if launched.ready_file is None:
            raise RuntimeError(f"{launched.name} was not started with a ready file")
        launched.info = wait_for_ready_file(launched.ready_file, launched.alive, timeout_s, launched.name,
                                            launched.log_tail)
        return launched.info

    def restart(self, launched: LaunchedProcess, *, wait: bool = True, timeout_s: float = 120.0) -> None:
        """Starts a stopped peer again with the same arguments (so the same identity file and id)."""
        if launched.alive():
            raise RuntimeError(f"{launched.name} is still running")
        if launched.ready_file is not None:
            launched.ready_file.unlink(missing_ok=True)  # the new incarnation writes its own
        with open(launched.log_path, "ab") as log_file:
            log_file.write(b"\n--- restarted ---\n")
            launched.process = subprocess.Popen(
                [sys.executable, *launched.entry, *launched.args],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_child_env(launched.threads), start_new_session=True,
            )
        launched.groups.append(launched.process.pid)
        launched.info = {}
        if wait:
            self.wait_ready(launched, timeout_s)

    def stop_peer(self, launched: LaunchedProcess, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        if launched.alive():
            launched.process.send_signal(sig)
            try:
                launched.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                launched.process.kill()
                launched.process.wait(10)

    def close(self) -> None:
        """Stops every process: peers first (SIGTERM, then SIGKILL after a short wait), then the bootstrap."""
        everyone = [*self.peers, *([self.bootstrap] if self.bootstrap else [])]
        for launched in everyone:
            if launched.alive():
                try:
                    os.killpg(launched.process.pid, signal.SIGCONT)  # a SIGSTOPped peer must wake to die
                except ProcessLookupError:
                    pass
                launched.process.terminate()
        deadline = time.monotonic() + 10.0
        for launched in everyone:
            try:
                launched.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for launched in everyone:
            if launched.alive():
                try:
                    os.killpg(launched.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                launched.process.wait(10)
        # Forked children (hivemind's DHT process, p2pd) stay in their group when a peer dies: stop
        # every group any incarnation ever had, so nothing outlives the swarm.
        for launched in everyone:
            for group in launched.groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
