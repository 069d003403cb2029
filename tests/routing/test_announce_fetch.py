"""Announcing and reading records through real hivemind DHT nodes on 127.0.0.1.

One small swarm (a bootstrap node, an announcing peer's node, a client-mode node) is shared by
the module because each node costs a process and a p2pd daemon; tests keep apart by model name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hivemind
import pytest
from hivemind.utils import get_dht_time

from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, model_key, sign_record
from brigade.routing.announce import Announcer
from brigade.routing.dht import start_dht, visible_maddrs
from brigade.routing.swarm import fetch_records

pytestmark = pytest.mark.timeout(60)


@dataclass
class Swarm:
    bootstrap: hivemind.DHT
    peer: hivemind.DHT  # the node peers announce through
    client: hivemind.DHT  # client mode: reads, stores nothing for others


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    started: list[hivemind.DHT] = []
    try:
        started.append(start_dht())
        initial_peers = visible_maddrs(started[0])
        started.append(start_dht(initial_peers))
        started.append(start_dht(initial_peers, client_mode=True))
        yield Swarm(*started)
    finally:
        for dht in reversed(started):
            dht.shutdown()


def record_factory(
    identity: Identity, model_name: str, start: int = 0, end: int = 8
) -> Callable[[str], PeerRecord]:
    def make_record(state: str) -> PeerRecord:
        return PeerRecord(
            peer_id=identity.peer_id,
            public_key=identity.public_key.hex(),
            address="127.0.0.1:5000",
            model_name=model_name,
            start_layer=start,
            end_layer=end,
            num_layers=16,
            dtype="float32",
            state=state,
            signed_at=get_dht_time(),
            expires_at=get_dht_time() + 30,
        )

    return make_record


def store_raw(dht: hivemind.DHT, model_name: str, subkey: str, value: object, ttl_s: float = 30.0) -> bool:
    return dht.store(model_key(model_name), value, get_dht_time() + ttl_s, subkey=subkey)


def test_announce_then_fetch_then_leaving(swarm: Swarm) -> None:
    identity = Identity.generate()
    announcer = Announcer(
        swarm.peer, identity, record_factory(identity, "test/announce"), period_s=5, ttl_s=30
    )

    async def scenario() -> None:
        assert await announcer.announce_once()
        [record] = await fetch_records(swarm.client, "test/announce")
        assert (record.peer_id, record.state, record.start_layer, record.end_layer) == (
            identity.peer_id,
            "online",
            0,
            8,
        )

        await announcer.announce_leaving()
        [record] = await fetch_records(swarm.client, "test/announce")
        assert record.state == "leaving"
        assert await fetch_records(swarm.client, "test/unknown-model") == []

    asyncio.run(scenario())


def test_forged_tampered_and_junk_records_are_refused(swarm: Swarm) -> None:
    """Every node's validator refuses these stores (tests/routing/test_validator_dht.py has more)."""
    model = "test/forged"
    honest, attacker, victim, tampering = (Identity.generate() for _ in range(4))
    announcer = Announcer(swarm.peer, honest, record_factory(honest, model))
    assert asyncio.run(announcer.announce_once())

    # the attacker's own valid record, stored under another peer's id
    assert not store_raw(
        swarm.peer, model, victim.peer_id, sign_record(record_factory(attacker, model)("online"), attacker)
    )
    # a record naming the honest peer (its id and key) but signed with the attacker's key
    claimed = record_factory(honest, model)("online")
    forged = {"fields": claimed.model_dump(), "signature": attacker.sign(b"anything").hex()}
    assert not store_raw(swarm.peer, model, victim.peer_id + "x", forged)
    # a validly signed record whose span was changed afterwards
    tampered = sign_record(record_factory(tampering, model)("online"), tampering)
    tampered["fields"]["end_layer"] = 16
    assert not store_raw(swarm.peer, model, tampering.peer_id, tampered)
    # a valid record of another model stored under this model's key, and plain junk
    other = Identity.generate()
    assert not store_raw(
        swarm.peer, model, other.peer_id, sign_record(record_factory(other, "test/other")("online"), other)
    )
    assert not store_raw(swarm.peer, model, "junk", "not a record")

    records = asyncio.run(fetch_records(swarm.client, model))
    assert [record.peer_id for record in records] == [honest.peer_id]


def test_short_ttl_record_expires(swarm: Swarm) -> None:
    identity = Identity.generate()
    announcer = Announcer(swarm.peer, identity, record_factory(identity, "test/ttl"), period_s=0.5, ttl_s=1.5)

    async def scenario() -> None:
        stored_at = get_dht_time()
        assert await announcer.announce_once()
        assert len(await fetch_records(swarm.client, "test/ttl")) == 1
        await asyncio.sleep(max(0.0, stored_at + announcer.ttl_s + 0.5 - get_dht_time()))
        assert await fetch_records(swarm.client, "test/ttl") == []

    asyncio.run(scenario())


def test_identity_path_keeps_the_dht_peer_id(tmp_path: Path) -> None:
    identity_path = str(tmp_path / "missing-folder" / "dht.key")
    peer_ids = []
    for _ in range(2):
        dht = start_dht(identity_path=identity_path)
        try:
            peer_ids.append(dht.peer_id)
        finally:
            dht.shutdown()
    assert peer_ids[0] == peer_ids[1]


def test_unreachable_initial_peers_raise_runtime_error(swarm: Swarm) -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = f"/ip4/127.0.0.1/tcp/{port}/p2p/{swarm.bootstrap.peer_id}"
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="initial peers"):
        start_dht([unreachable], startup_timeout_s=20)
    assert time.monotonic() - began < 20


def test_run_keeps_re_announcing_until_cancelled(swarm: Swarm) -> None:
    identity = Identity.generate()
    announcer = Announcer(swarm.peer, identity, record_factory(identity, "test/run"), period_s=0.3, ttl_s=5)

    async def poll_signed_at(after: float) -> float:
        """The record's signed_at once it is newer than ``after``; polls, as run() keeps its own pace."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            records = await fetch_records(swarm.client, "test/run")
            if records and records[0].signed_at > after:
                return records[0].signed_at
            await asyncio.sleep(0.1)
        raise AssertionError("run() did not (re-)announce within 20 s")

    async def scenario() -> None:
        task = asyncio.create_task(announcer.run())
        try:
            first = await poll_signed_at(float("-inf"))
            await poll_signed_at(first)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_dht_that_does_not_answer_or_is_gone_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    identity = Identity.generate()
    dht = start_dht()
    announcer = Announcer(dht, identity, record_factory(identity, "test/gone"), store_timeout_s=0.5)
    try:
        os.kill(dht.pid, signal.SIGSTOP)  # the DHT process cannot answer at all: a timeout, not a race
        try:
            with caplog.at_level(logging.WARNING, logger="brigade.routing"):
                assert asyncio.run(fetch_records(dht, "test/gone", timeout_s=0.5)) == []
                assert asyncio.run(announcer.announce_once()) is False
            assert caplog.text.count("timed out") == 2
        finally:
            os.kill(dht.pid, signal.SIGCONT)
    finally:
        dht.shutdown()
    assert asyncio.run(announcer.announce_once()) is False
    assert asyncio.run(fetch_records(dht, "test/gone")) == []
