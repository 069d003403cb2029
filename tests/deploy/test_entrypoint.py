"""Environment variables map one-to-one to CLI flags, the docs list every one of them, and the
compose hand-off (bootstrap publishes its multiaddrs, a peer joins from the file) works with real
processes, checked by the same health checks the images run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brigade.deploy.entrypoint import (
    EntrypointError,
    build_argv,
    env_name,
    find_command,
    mapping,
    reachable_from_elsewhere,
    root_command,
    split_command,
    unknown_variables,
)
from brigade.deploy.healthcheck import check_peer, check_tcp, dht_address, peer_address

ROOT = Path(__file__).resolve().parents[2]


def test_every_flag_of_peer_run_maps_to_one_variable() -> None:
    command = find_command(["peer", "run"])
    names = {env: param for env, param in mapping(command)}
    assert env_name(names["BRIGADE_MODEL"]) == "BRIGADE_MODEL"
    assert {"BRIGADE_INITIAL_PEERS", "BRIGADE_ANNOUNCE_HOST", "BRIGADE_ANNOUNCE_PORT", "BRIGADE_DHT_LISTEN",
            "BRIGADE_MAX_MEMORY", "BRIGADE_DRAIN_GRACE"} <= set(names)
    assert len(names) == len(command.params) - sum(param.name == "help" for param in command.params)


def test_environment_becomes_the_command_line() -> None:
    env = {
        "BRIGADE_MODEL": "/models/tiny",
        "BRIGADE_INITIAL_PEERS": "/ip4/10.0.0.1/tcp/1/p2p/A, /ip4/10.0.0.2/tcp/1/p2p/B",
        "BRIGADE_LAYERS": "0:3",
        "BRIGADE_PORT": "31330",
        "BRIGADE_DHT_LISTEN": "/ip4/0.0.0.0/tcp/31331",
        "BRIGADE_LISTEN": "ignored by peer run",  # a flag of `dht`: set in a shared env, skipped here
    }
    argv = build_argv(["peer", "run"], ["--num-threads", "2"], env)
    assert argv == ["peer", "run", "/models/tiny",
                    "--initial-peers", "/ip4/10.0.0.1/tcp/1/p2p/A", "--initial-peers", "/ip4/10.0.0.2/tcp/1/p2p/B",
                    "--layers", "0:3", "--port", "31330", "--dht-listen", "/ip4/0.0.0.0/tcp/31331",
                    "--num-threads", "2"]
    assert build_argv(["demo"], [], {"BRIGADE_GREEDY": "yes"}) == ["demo", "--greedy"]
    assert build_argv(["demo"], [], {"BRIGADE_GREEDY": "0"}) == ["demo", "--no-greedy"]
    assert build_argv(["dht"], [], {"BRIGADE_PORT": "1"}) == ["dht"]


def test_bad_environments_say_which_variable() -> None:
    with pytest.raises(EntrypointError, match="set BRIGADE_MODEL"):
        build_argv(["peer", "run"], [], {})
    with pytest.raises(EntrypointError, match="BRIGADE_GREEDY must be true or false"):
        build_argv(["demo"], [], {"BRIGADE_GREEDY": "maybe"})
    with pytest.raises(EntrypointError, match="needs a subcommand: run"):
        find_command(["peer"])
    with pytest.raises(EntrypointError, match="no command 'nope'"):
        find_command(["nope"])
    assert unknown_variables({"BRIGADE_MODLE": "x", "BRIGADE_PORT": "1", "HOME": "/"}, root_command()) == \
        ["BRIGADE_MODLE"]
    assert reachable_from_elsewhere(["/ip4/127.0.0.1/tcp/1/p2p/A", "/ip4/172.18.0.2/tcp/1/p2p/A"]) == \
        ["/ip4/172.18.0.2/tcp/1/p2p/A"]
    assert reachable_from_elsewhere(["/ip4/127.0.0.1/tcp/1/p2p/A"]) == ["/ip4/127.0.0.1/tcp/1/p2p/A"]
    assert split_command(["peer", "run", "--port", "1"], root_command()) == (["peer", "run"], ["--port", "1"])
    # A prompt given after the command stands in for the required positional.
    assert build_argv(["generate"], ["hello"], {"BRIGADE_MODEL": "/m", "BRIGADE_INITIAL_PEERS": "/ip4/1"}) == \
        ["generate", "/m", "--initial-peers", "/ip4/1", "hello"]


def test_docs_list_every_variable_of_the_images_commands() -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    documented = set(re.findall(r"`(BRIGADE_[A-Z_]+)`", docs))
    for path in (["peer", "run"], ["dht"]):
        missing = {name for name, _ in mapping(find_command(path))} - documented
        assert not missing, f"docs/deploy.md does not list {sorted(missing)} of `brigade {' '.join(path)}`"
    assert {"BRIGADE_PUBLISH_MADDRS", "BRIGADE_INITIAL_PEERS_FILE", "BRIGADE_INITIAL_PEERS_WAIT"} <= documented


def test_health_check_addresses_follow_the_same_variables() -> None:
    assert peer_address({"BRIGADE_HOST": "0.0.0.0", "BRIGADE_PORT": "4000"}) == "127.0.0.1:4000"
    assert peer_address({}) == "127.0.0.1:31330"
    assert dht_address({"BRIGADE_LISTEN": "/ip4/0.0.0.0/tcp/31337"}) == "127.0.0.1:31337"
    assert check_tcp("127.0.0.1:1", timeout_s=1.0) is not None


def _entrypoint(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "brigade.deploy.entrypoint", *args], env=full_env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(predicate, timeout_s: float, what: str, log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def test_bootstrap_publishes_its_maddrs_and_a_peer_joins_from_the_file(tmp_path: Path) -> None:
    """The compose flow without Docker: both processes configured only through the environment."""
    from brigade.kernels.default_model import DEFAULT_MODEL_DIR

    shared = tmp_path / "swarm" / "initial-peers"
    shared.parent.mkdir()
    shared.write_text('["/ip4/127.0.0.1/tcp/9/p2p/stale"]')  # a previous run's file must not be used
    boot_log, peer_log = tmp_path / "boot.log", tmp_path / "peer.log"
    ready_file = tmp_path / "peer.ready.json"
    boot = _entrypoint(["dht"], {"BRIGADE_LISTEN": "/ip4/127.0.0.1/tcp/0", "BRIGADE_PUBLISH_MADDRS": str(shared),
                                 "BRIGADE_IDENTITY": str(tmp_path / "dht.key")}, boot_log)
    peer = None
    try:
        _wait(lambda: "stale" not in shared.read_text(errors="replace") if shared.exists() else False, 60,
              "the bootstrap did not publish its multiaddrs", boot_log)
        port = re.search(r"/tcp/(\d+)/", shared.read_text())
        assert port and check_tcp(f"127.0.0.1:{port.group(1)}") is None
        peer = _entrypoint(["peer", "run"], {
            "BRIGADE_MODEL": str(DEFAULT_MODEL_DIR), "BRIGADE_LAYERS": "0:6", "BRIGADE_INITIAL_PEERS_FILE": str(shared),
            "BRIGADE_HOST": "127.0.0.1", "BRIGADE_PORT": "0", "BRIGADE_NUM_THREADS": "1",
            "BRIGADE_DRAIN_GRACE": "1", "BRIGADE_IDENTITY": str(tmp_path / "peer.key"),
            "BRIGADE_READY_FILE": str(ready_file),
        }, peer_log)
        _wait(ready_file.exists, 120, "the peer was not ready", peer_log)
        address = json.loads(ready_file.read_text())["address"]
        assert f"ready: peer {json.loads(ready_file.read_text())['peer_id']}" in peer_log.read_text()
        assert check_peer(address) is None
        assert (tmp_path / "peer.key").exists() and (tmp_path / "dht.key").exists()
    finally:
        for process in (peer, boot):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)  # the entrypoint passes it on; the peer drains
        for process in (peer, boot):
            if process is not None:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    pytest.fail("an entrypoint did not stop on SIGTERM")
    assert check_peer(address, timeout_s=1.0) is not None  # gone
