"""The testbed's plans without root: addresses, the exact ip/tc calls, profiles, and result arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brigade.deploy.testbed import netns
from brigade.deploy.testbed.netns import network_commands, plan_hosts, shaping_commands
from brigade.deploy.testbed.profiles import PROFILES, get_profile
from brigade.deploy.testbed.runner import GenerationResult, Testbed, TestbedConfig

RUN = "brigade-tb-123-abcdef"


def test_hosts_get_their_own_namespace_address_and_hub_link() -> None:
    hosts = plan_hosts(RUN, ["boot", "p0", "p1", "client"], {"p0": 30.0, "p1": 60.0})
    assert [host.namespace for host in hosts] == [f"{RUN}-boot", f"{RUN}-p0", f"{RUN}-p1", f"{RUN}-client"]
    assert [host.address for host in hosts] == ["10.77.0.2", "10.77.0.3", "10.77.0.4", "10.77.0.5"]
    assert [host.rtt_ms for host in hosts] == [0.0, 30.0, 60.0, 0.0]
    assert all(len(host.hub_link) <= 15 for host in hosts)  # IFNAMSIZ


def test_network_touches_only_namespaces_of_its_run() -> None:
    hosts = plan_hosts(RUN, ["boot", "p0"], {})
    commands = network_commands(RUN, hosts)
    for argv in commands:
        # Either a namespace of this run is created, or the call runs inside one (-n NS).
        if argv[:3] == ["ip", "netns", "add"]:
            assert argv[3].startswith(RUN + "-")
        else:
            assert argv[1] == "-n" and argv[2].startswith(RUN + "-"), argv
    veths = [argv for argv in commands if "veth" in argv]
    assert len(veths) == 2 and all(argv[-2:] == ["netns", f"{RUN}-{role}"] for argv, role in zip(veths, ["boot", "p0"],
                                                                                                   strict=True))


def test_shaping_without_netem_is_tbf_on_both_ends() -> None:
    host = plan_hosts(RUN, ["p0"], {"p0": 50.0})[0]
    commands = shaping_commands(RUN, host, get_profile("internet"), netem=False)
    assert [argv[2] for argv in commands] == [host.namespace, f"{RUN}-hub"]
    assert all("tbf" in argv and "100mbit" in argv and "netem" not in argv for argv in commands)


def test_shaping_with_netem_adds_half_the_round_trip_each_way_above_tbf() -> None:
    host = plan_hosts(RUN, ["p0"], {"p0": 50.0})[0]
    commands = shaping_commands(RUN, host, get_profile("bad"), netem=True)
    netem = [argv for argv in commands if "netem" in argv]
    tbf = [argv for argv in commands if "tbf" in argv]
    assert len(netem) == 2 and len(tbf) == 2
    for argv in netem:
        assert argv[argv.index("delay") + 1] == "25ms" and "loss" in argv
    for argv in tbf:
        assert argv[argv.index("parent") + 1] == "1:1" and "10mbit" in argv


def test_profiles_draw_round_trips_in_range_and_repeatably() -> None:
    internet = get_profile("internet")
    rtts = internet.hop_rtts(8, seed=3)
    assert rtts == internet.hop_rtts(8, seed=3)
    assert all(25.0 <= rtt <= 80.0 for rtt in rtts) and len(set(rtts)) > 1
    assert get_profile("lan").hop_rtts(2, 0) == [1.0, 1.0]
    assert get_profile("bad").link(150.0).delay_ms == 75.0
    assert set(PROFILES) == {"lan", "internet", "bad"}
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("moon")


def test_result_measures_steps_after_the_first_token_against_the_route_floor() -> None:
    hosts = plan_hosts(RUN, ["p0", "p1"], {"p0": 30.0, "p1": 50.0})
    result = GenerationResult([1, 2], [5, 6, 7], [0.5, 0.6, 0.72], ["a[0:1]", "b[1:2]"], hosts)
    assert result.first_token_ms == pytest.approx(500.0)
    assert result.step_ms == pytest.approx([100.0, 120.0])
    assert result.ms_per_token == pytest.approx(110.0)
    assert result.mode == "forwarding"
    # Forwarding: one way into each hop plus one way back from the last.
    assert result.floor_ms == pytest.approx(30.0 / 2 + 50.0 / 2 + 50.0 / 2)
    client_driven = GenerationResult([1, 2], [5, 6, 7], [0.5, 0.6, 0.72], ["a[0:1]", "b[1:2]"], hosts, mode="client")
    assert client_driven.floor_ms == pytest.approx(80.0)  # one round trip per hop
    assert "p0[0:1] 10.77.0.2 (rtt 30 ms) -> p1[1:2]" in result.describe_route()
    speculative = GenerationResult([1, 2], [5, 6, 7], [0.5, 0.6, 0.72], ["a[0:1]", "b[1:2]"], hosts,
                                   mode="speculative")
    assert speculative.floor_ms == result.floor_ms  # speculation rides on forwarding


def test_a_fixed_round_trip_replaces_the_profiles_range() -> None:
    config = TestbedConfig(model="unused", spans=((0, 1), (1, 2), (2, 3)), profile="lan", rtt_ms=50.0)
    testbed = Testbed(config)  # plans only: nothing starts before start()
    assert [host.rtt_ms for host in testbed.hosts if host.role.startswith("p")] == [50.0] * 3


def test_a_run_is_live_only_while_its_owner_process_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "MARKER_DIR", tmp_path)
    mine = netns.new_run_id()
    netns.write_marker(mine)
    assert netns.owner_alive(mine)
    # Same pid, another start time: the pid was reused by a process that is not the owner.
    marker = tmp_path / f"{mine}.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "start_time": "1"}))
    assert not netns.owner_alive(mine)
    netns.remove_marker(mine)
    netns.remove_marker(mine)  # idempotent
    # Without a marker the pid in the name decides, erring on the side of a live run.
    assert netns.owner_alive(mine)
    assert not netns.owner_alive(f"{netns.PREFIX}999999999-abcdef")
