"""The testbed's hosts: network namespaces on a private bridge, with shaped links.

Every host is its own network namespace (its own addresses, ports and loopback) with one veth
link to a bridge that lives in a hub namespace of its own. Nothing is added to the machine's own
namespace: no bridge, no address, no route, so the testbed cannot reach anything outside itself
and nothing outside can reach it. Deleting the namespaces deletes every link, bridge and queue.

Names carry a run id, ``brigade-tb-<owner pid>-<random>``, and each run writes a marker naming
its owner process (pid and start time). A leftover of a run that was killed cannot be mistaken
for a live one: ``sweep_stale`` removes namespaces whose owner is gone, and never touches
another live run's.

The command lists are built by pure functions (``network_commands``, ``shaping_commands``) so the
exact ``ip`` / ``tc`` calls can be read and tested without root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from brigade.deploy.testbed.profiles import NetProfile

logger = logging.getLogger(__name__)

PREFIX = "brigade-tb-"
MARKER_DIR = Path("/run/brigade-testbed")  # tmpfs, like /run/netns: both vanish on reboot together
_RUN_NAME = re.compile(r"^(brigade-tb-\d+-[0-9a-f]{6})-([a-z0-9]+)$")
COMMAND_TIMEOUT_S = 15.0


class TestbedError(RuntimeError):
    """A testbed could not be built (no root, no namespaces, a failed ``ip`` or ``tc`` call)."""

    __test__ = False  # not a pytest test class, whatever its name says


@dataclass(frozen=True)
class Host:
    role: str  # "boot", "p0".."pN", "client"
    namespace: str  # the network namespace's name
    address: str  # its IPv4 address on the testbed's bridge
    hub_link: str  # the far end of its veth pair, in the hub namespace
    rtt_ms: float = 0.0  # round trip added to traffic to and from this host (0 = none)


def new_run_id() -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


def plan_hosts(run_id: str, roles: list[str], rtts_ms: dict[str, float], subnet: str = "10.77.0") -> list[Host]:
    """Addresses: .2 for the first role, counting up; a role's veth in the hub is ``v-<role>``."""
    if len(roles) > 200:
        raise ValueError("at most 200 hosts on one testbed bridge")
    return [
        Host(role, f"{run_id}-{role}", f"{subnet}.{index + 2}", f"v-{role}", rtts_ms.get(role, 0.0))
        for index, role in enumerate(roles)
    ]


def hub_namespace(run_id: str) -> str:
    return f"{run_id}-hub"


def network_commands(run_id: str, hosts: list[Host], prefix_len: int = 24) -> list[list[str]]:
    """The ``ip`` calls that make the hub, its bridge, and each host with its veth link."""
    hub = hub_namespace(run_id)
    commands = [
        ["ip", "netns", "add", hub],
        ["ip", "-n", hub, "link", "set", "dev", "lo", "up"],
        ["ip", "-n", hub, "link", "add", "dev", "br0", "type", "bridge"],
        ["ip", "-n", hub, "link", "set", "dev", "br0", "up"],
    ]
    for host in hosts:
        commands += [
            ["ip", "netns", "add", host.namespace],
            ["ip", "-n", hub, "link", "add", "dev", host.hub_link, "type", "veth",
             "peer", "name", "eth0", "netns", host.namespace],
            ["ip", "-n", hub, "link", "set", "dev", host.hub_link, "master", "br0"],
            ["ip", "-n", hub, "link", "set", "dev", host.hub_link, "up"],
            ["ip", "-n", host.namespace, "link", "set", "dev", "lo", "up"],
            ["ip", "-n", host.namespace, "addr", "add", f"{host.address}/{prefix_len}", "dev", "eth0"],
            ["ip", "-n", host.namespace, "link", "set", "dev", "eth0", "up"],
        ]
    return commands


def _tbf(rate_mbit: float) -> list[str]:
    rate_bytes = rate_mbit * 1e6 / 8
    # The bucket must hold at least one timer tick of traffic and a full GSO segment (64 KiB).
    burst = max(int(rate_bytes * 0.005), 96 * 1024)
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "100ms"]


def shaping_commands(run_id: str, host: Host, profile: NetProfile, *, netem: bool) -> list[list[str]]:
    """Queues on both ends of a host's link: its upload leaves by ``eth0``, its download by the hub's end.

    With ``netem`` the kernel also adds half the host's round trip in each direction (plus jitter
    and loss); without it only bandwidth is shaped here and the delay proxy adds the latency.
    """
    commands = []
    for namespace, device in ((host.namespace, "eth0"), (hub_namespace(run_id), host.hub_link)):
        if netem and host.rtt_ms > 0:
            delay = [f"{host.rtt_ms / 2:g}ms"] + ([f"{profile.jitter_ms:g}ms"] if profile.jitter_ms else [])
            loss = ["loss", f"{profile.loss_percent:g}%"] if profile.loss_percent else []
            commands += [
                ["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "handle", "1:",
                 "netem", "delay", *delay, *loss],
                ["tc", "-n", namespace, "qdisc", "replace", "dev", device, "parent", "1:1", "handle", "10:",
                 *_tbf(profile.bandwidth_mbit)],
            ]
        else:
            commands.append(["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root",
                             *_tbf(profile.bandwidth_mbit)])
    return commands


def run_command(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.CalledProcessError as e:
        raise TestbedError(f"{' '.join(argv)} failed: {e.stderr.decode(errors='replace').strip()}") from e
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TestbedError(f"{' '.join(argv)} failed: {e}") from e


def namespaces_available() -> str | None:
    """None when this process can make network namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, veth links, tc)"
    probe = f"{PREFIX}probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        run_command(["ip", "netns", "add", probe])
    except TestbedError as e:
        return f"cannot create a network namespace here: {e}"
    try:
        run_command(["ip", "-n", probe, "link", "add", "dev", "br0", "type", "bridge"])
        run_command(["ip", "-n", probe, "link", "add", "dev", "va", "type", "veth", "peer", "name", "vb"])
        run_command(["tc", "-n", probe, "qdisc", "add", "dev", "va", "root", *_tbf(100)])
    except TestbedError as e:
        return f"network namespaces work but bridges, veth links or tbf do not: {e}"
    finally:
        with contextlib.suppress(TestbedError):
            run_command(["ip", "netns", "del", probe])
    return None


def netem_available(namespace: str) -> bool:
    """Whether the kernel has the netem qdisc (tried on the loopback of a namespace we own)."""
    try:
        run_command(["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    except TestbedError:
        return False
    with contextlib.suppress(TestbedError):
        run_command(["tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root"])
    return True


def list_namespaces() -> list[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    try:
        out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(token) for token in out.split() if token.isdigit()]


def kill_namespace_processes(namespace: str) -> int:
    """SIGKILLs every process inside ``namespace`` (all of them are the testbed's own)."""
    pids = namespace_pids(namespace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def delete_namespaces(namespaces: list[str]) -> None:
    """Kills what runs inside, then deletes each namespace; missing ones are fine (idempotent)."""
    for namespace in namespaces:
        kill_namespace_processes(namespace)
    deadline = time.monotonic() + 5.0
    while any(namespace_pids(ns) for ns in namespaces) and time.monotonic() < deadline:
        time.sleep(0.05)
    existing = set(list_namespaces())
    for namespace in namespaces:
        if namespace in existing:
            try:
                run_command(["ip", "netns", "del", namespace])
            except TestbedError as e:
                logger.warning("could not delete namespace %s: %s", namespace, e)


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def write_marker(run_id: str) -> Path:
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    path = MARKER_DIR / f"{run_id}.json"
    path.write_text(json.dumps({"pid": os.getpid(), "start_time": _start_time(os.getpid()), "created": time.time()}))
    return path


def remove_marker(run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (MARKER_DIR / f"{run_id}.json").unlink()


def owner_alive(run_id: str) -> bool:
    """True while the process that made ``run_id`` still runs (same pid and the same start time).

    Without a readable marker the pid in the name decides, erring on the side of a live run.
    """
    try:
        marker = json.loads((MARKER_DIR / f"{run_id}.json").read_text())
    except (OSError, ValueError):
        pid = run_id[len(PREFIX):].split("-")[0]
        return pid.isdigit() and _start_time(int(pid)) is not None
    return isinstance(marker, dict) and _start_time(int(marker.get("pid", -1))) == marker.get("start_time")


def sweep_stale() -> list[str]:
    """Removes namespaces (and markers) of testbed runs whose owner process is gone; returns them."""
    runs: dict[str, list[str]] = {}
    for namespace in list_namespaces():
        match = _RUN_NAME.match(namespace)
        if match:
            runs.setdefault(match.group(1), []).append(namespace)
        elif namespace.startswith(f"{PREFIX}probe-"):
            pid = namespace.split("-")[3]
            if pid.isdigit() and _start_time(int(pid)) is None:
                runs.setdefault(namespace, []).append(namespace)
    removed = []
    for run_id, namespaces in runs.items():
        if owner_alive(run_id):
            continue
        logger.warning("removing a leftover testbed run %s (its owner is gone): %s", run_id, ", ".join(namespaces))
        delete_namespaces(namespaces)
        remove_marker(run_id)
        removed += namespaces
    if MARKER_DIR.exists():
        for marker in MARKER_DIR.glob(f"{PREFIX}*.json"):
            if not owner_alive(marker.stem):
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
    return removed


class Network:
    """The hub, its bridge and one namespace per host. ``create`` builds it; ``close`` removes it all."""

    def __init__(self, run_id: str, hosts: list[Host], profile: NetProfile, *, emulation: str = "auto"):
        if emulation not in ("auto", "proxy", "netem"):
            raise ValueError(f"emulation must be auto, proxy or netem, got {emulation!r}")
        self.run_id = run_id
        self.hosts = hosts
        self.profile = profile
        self.emulation = emulation
        self.netem = False  # decided by create(): the kernel adds delay itself
        self.extra_namespaces: list[str] = []  # namespaces off the bridge (homes behind routers: homes.py)
        self._created = False

    @property
    def namespaces(self) -> list[str]:
        return [host.namespace for host in self.hosts] + self.extra_namespaces + [hub_namespace(self.run_id)]

    def create(self) -> None:
        write_marker(self.run_id)
        self._created = True
        for argv in network_commands(self.run_id, self.hosts):
            run_command(argv)
        if self.emulation != "proxy":
            self.netem = netem_available(hub_namespace(self.run_id))
            if self.emulation == "netem" and not self.netem:
                raise TestbedError("--emulation netem: this kernel has no netem qdisc (use proxy or auto)")
        for host in self.hosts:
            for argv in shaping_commands(self.run_id, host, self.profile, netem=self.netem):
                run_command(argv)
        logger.info("testbed network %s: %d hosts, %s, delay by %s", self.run_id, len(self.hosts),
                    self.profile.name, "netem" if self.netem else "delay proxies")

    def close(self) -> None:
        """Idempotent: kills whatever still runs inside, deletes every namespace and the marker."""
        if not self._created:
            return
        delete_namespaces(self.namespaces)
        remove_marker(self.run_id)
        self._created = False

    def host(self, role: str) -> Host:
        for host in self.hosts:
            if host.role == role:
                return host
        raise KeyError(role)
