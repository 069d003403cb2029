"""Processes inside testbed hosts: started in a namespace, read through a log, stopped in order.

Each process runs as ``ip netns exec <host> python ...`` (``ip`` enters the namespace and execs,
so the pid is the Python process itself) in a session of its own, and asks the kernel to kill it
if the testbed process dies: a testbed killed with SIGKILL leaves no running peers or bootstrap
behind, only its namespaces (and at most a helper such as torch's shared-memory manager inside
them), which ``sweep_stale`` (the next run, or ``python -m brigade.deploy.testbed cleanup``) kills
and removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from brigade.deploy.launcher import wait_for_ready_file
from brigade.deploy.testbed.netns import Host

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec; the setting survives exec of a plain binary."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # processes of one machine take turns on its cores
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # testbed hosts reach nothing but each other
    return env


@dataclass
class HostProcess:
    name: str
    host: Host
    process: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, object] = field(default_factory=dict)
    ready_file: Path | None = None  # where a peer writes its ready JSON (``--ready-file``)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, mark: str, timeout_s: float) -> dict[str, object]:
        """Waits for a ``MARK {json}`` (or ``MARK text``) line in the log; the process must not exit first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(mark + " "):
                    payload = line[len(mark) + 1 :].strip()
                    try:
                        self.info = json.loads(payload)
                    except ValueError:
                        self.info = {"value": payload}
                    return self.info
            if not self.alive():
                raise RuntimeError(f"{self.name} on {self.host.namespace} exited early:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def wait_ready_file(self, timeout_s: float) -> dict[str, object]:
        """Waits for the peer's ready file (``--ready-file``); the process must not exit first."""
        if self.ready_file is None:
            raise RuntimeError(f"{self.name} was not started with a ready file")
        self.info = wait_for_ready_file(self.ready_file, self.alive, timeout_s, f"{self.name} on "
                                        f"{self.host.namespace}", self.log_tail)
        return self.info

    def terminate(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5.0)


def spawn(host: Host, name: str, python_args: list[str], log_dir: Path, threads: int | None = None) -> HostProcess:
    """Starts ``python <python_args>`` inside ``host``'s namespace, output to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, sys.executable, *python_args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(threads),
            start_new_session=True,  # Ctrl-C reaches the testbed only; it stops children in order
            preexec_fn=_die_with_parent,  # only the main thread spawns, so no lock is held across fork
        )
    return HostProcess(name, host, process, log_path)


def stop_all(processes: list[HostProcess], grace_s: float = 5.0) -> None:
    """SIGTERM to all at once (peers drain), then SIGKILL whatever is left after ``grace_s``."""
    for launched in processes:
        launched.terminate()
    deadline = time.monotonic() + grace_s
    for launched in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            launched.process.wait(max(0.05, deadline - time.monotonic()))
    for launched in processes:
        launched.kill()
