"""A peer's config is built from `brigade peer run`'s parameters by name (a default is written once),
checks itself, and a peer process is only ever built by ``PeerServer.create``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer

from brigade.deploy.entrypoint import find_command
from brigade.peer.cli import config_from_options
from brigade.peer.config import PeerConfig
from brigade.peer.ready import write_ready_file
from brigade.peer.server import PeerServer


def _defaults(**given: object) -> dict[str, object]:
    """``run``'s parameters as typer passes them when only ``given`` is on the command line."""
    options = {param.name: param.default for param in find_command(["peer", "run"]).params}
    return {**options, **given}


def test_the_clis_defaults_are_the_configs() -> None:
    config = config_from_options(_defaults(model="m", initial_peers=["/ip4/1"]))
    expected = PeerConfig(model="m", initial_peers=("/ip4/1",), allowed_clients=None, allowed_peers=None)
    assert config == expected
    for field in dataclasses.fields(PeerConfig):  # every field a flag sets keeps the config's own default
        assert getattr(config, field.name) == getattr(expected, field.name), field.name


def test_renamed_and_converted_parameters_reach_their_fields() -> None:
    config = config_from_options(_defaults(
        model="m", initial_peers=["a", "b"], layers="2:5", quant="nf4", max_memory="1GiB", drain_grace=3.0,
        ping_period=-1.0, relay_max_bytes="0", relay_max_connections=8, ready_file="/tmp/ready.json"))
    assert (config.start_layer, config.end_layer, config.quantization) == (2, 5, "nf4")
    assert (config.max_memory_bytes, config.drain_grace_s, config.ping_period_s) == (1 << 30, 3.0, 0.0)
    assert (config.relay_max_bytes_per_hour, config.relay_max_connections_per_peer) == (0, 8)
    assert config.ready_file == "/tmp/ready.json" and config.initial_peers == ("a", "b")


@pytest.mark.parametrize(("change", "message"), [
    ({"dtype": "float64"}, r"dtype \(--dtype\) must be"),
    ({"quantization": "int4"}, r"quantization \(--quant\)"),
    ({"reachability": "maybe"}, r"reachability \(--reachability\)"),
    ({"announce_port": 70000}, r"announce_port \(--announce-port\)"),
    ({"start_layer": 4, "end_layer": 2}, r"0 <= START < END"),
    ({"throughput": "fast"}, "throughput must be auto, eval"),
])
def test_a_config_refuses_values_out_of_range(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PeerConfig(model="m", **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PeerConfig(model="m"), **change)


def test_the_cli_turns_a_bad_value_into_a_usage_error() -> None:
    with pytest.raises(typer.BadParameter, match=r"dtype \(--dtype\)"):
        config_from_options(_defaults(model="m", initial_peers=["x"], dtype="int3"))


def test_a_peer_is_built_by_create_only() -> None:
    with pytest.raises(TypeError, match=r"PeerServer\.create"):
        PeerServer(PeerConfig(model="m"), identity=None, model_name="m", dht=None, model_config=None,  # type: ignore[arg-type]
                   throughput=None, started_at=0.0, tls=None, services=None, auto_span=False,  # type: ignore[arg-type]
                   stack=None)  # type: ignore[arg-type]


def test_the_ready_file_is_whole_json_and_replaces_an_old_one(tmp_path: Path) -> None:
    target = tmp_path / "run" / "peer.ready.json"
    write_ready_file(target, {"peer_id": "old"})
    write_ready_file(target, {"peer_id": "new", "address": "127.0.0.1:1"})
    assert json.loads(target.read_text()) == {"peer_id": "new", "address": "127.0.0.1:1"}
    assert [path.name for path in target.parent.iterdir()] == ["peer.ready.json"]  # no temporary left behind
