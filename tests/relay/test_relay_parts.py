"""The pure parts of reachability and relaying: names, verdicts, advice, caps, records, route costs."""

from __future__ import annotations

import asyncio
import random

import pytest

from brigade.client.config import ClientConfig
from brigade.client.remote import RemoteSwarm
from brigade.peer.reachability import (
    ProbeResult,
    Verdict,
    advice,
    choose_probers,
    decide,
    observed_host,
    probe_target,
)
from brigade.peer.relay import _ByteBudget, parse_connect, source_key
from brigade.peer.relayed import relay_candidates
from brigade.protocol.channels import RelayDialError, dial, relay_target, relayed_peer_of
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, RecordError, _canonical, check_signed, sign
from brigade.routing.route import RouteCosts, find_route, route_ms

IDS = [Identity.generate() for _ in range(4)]


def record(index: int, *, start: int = 0, end: int = 4, relay: str = "", reachable: bool | None = None,
           relay_address: str = "", state: str = "online", signed_at: float = 100.0) -> PeerRecord:
    identity = IDS[index]
    return PeerRecord(peer_id=identity.peer_id, public_key=identity.public_key.hex(), address=f"10.0.0.{index}:5000",
                      model_name="m", start_layer=start, end_layer=end, num_layers=4, dtype="float32",
                      throughput=100.0, signed_at=signed_at, expires_at=signed_at + 20, relay_peer_id=relay,
                      reachable=reachable, relay_address=relay_address, state=state)  # type: ignore[arg-type]


# -- naming a relayed peer to its relay -------------------------------------------------------------
def test_relay_target_round_trips_and_rejects_anything_else() -> None:
    peer_id = IDS[0].peer_id
    assert relayed_peer_of(relay_target(peer_id)) == peer_id
    for authority in ("example.com:443", f"{peer_id}.relayed.brigade.invalid:80", ".relayed.brigade.invalid:443",
                      f"a/b{peer_id}.relayed.brigade.invalid:443", f"{peer_id}.relayed.brigade.invalid"):
        assert relayed_peer_of(authority) is None, authority
    head = f"CONNECT {relay_target(peer_id)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    assert parse_connect(head) == peer_id
    assert parse_connect(b"GET / HTTP/1.1\r\n\r\n") is None
    assert parse_connect(b"CONNECT \xff HTTP/1.1\r\n\r\n") is None


def test_a_no_proxy_entry_that_would_bypass_the_relay_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "localhost,.invalid")
    monkeypatch.delenv("no_grpc_proxy", raising=False)
    with pytest.raises(RelayDialError, match=r"no_proxy entry '\.invalid'"):
        dial("127.0.0.1:1", "", allow_insecure=True, relay_for=IDS[0].peer_id)
    monkeypatch.setenv("no_grpc_proxy", "localhost")  # takes precedence over no_proxy, as in gRPC

    async def dial_and_close() -> None:  # an aio channel belongs to a running loop
        await dial("127.0.0.1:1", "", allow_insecure=True, relay_for=IDS[0].peer_id).close()

    asyncio.run(dial_and_close())


# -- verdicts and advice ----------------------------------------------------------------------------
def _result(reachable: bool, answered: bool = True, observed: str = "") -> ProbeResult:
    return ProbeResult("bpX", answered, reachable, "" if reachable else "refused", observed)


def test_verdict_is_the_majority_of_answers_a_tie_is_unreachable_and_silence_is_unknown() -> None:
    assert decide([]) is None
    assert decide([_result(False, answered=False)] * 3) is None
    assert decide([_result(True)]) is True
    assert decide([_result(True), _result(False)]) is False  # relayed works for everyone; wrongly direct fails
    assert decide([_result(True), _result(True), _result(False)]) is True
    assert decide([_result(True), _result(False, answered=False)]) is True


def test_observed_host_reads_grpc_peer_strings() -> None:
    assert observed_host("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert observed_host("ipv6:[::1]:5555") == "::1"
    assert observed_host("ipv6:[::ffff:10.0.0.7]:80") == "10.0.0.7"
    assert observed_host("unix:/tmp/sock") is None
    assert observed_host("ipv4:nonsense") is None


def test_relay_caps_count_an_ipv6_64_as_one_source() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")  # the next /64 is another source
    assert source_key("203.0.113.7") == "203.0.113.7" != source_key("203.0.113.8")
    assert source_key("::ffff:203.0.113.7") == "203.0.113.7"  # IPv4-mapped counts as its IPv4 address
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("?") == "?"


def test_probers_dial_only_where_the_request_came_from() -> None:
    # Documentation ranges (203.0.113.0/24, 2001:db8::/32) are not public: a private swarm's rules.
    private = {"allow_private": True}
    assert probe_target("203.0.113.5:31330", "203.0.113.5", **private) == "203.0.113.5:31330"
    assert probe_target("192.168.1.20:31330", "203.0.113.5", **private) is None  # a LAN address behind NAT
    assert probe_target("198.51.100.1:22", "203.0.113.5", **private) is None  # a third party: never dialed
    assert probe_target("peer.example.org:31330", "203.0.113.5", **private) is None  # names: resolved by Probe
    # Through a proxy on the prober's own machine the source is hidden: the announced address is dialed.
    assert probe_target("203.0.113.9:31330", "127.0.0.1", **private) == "203.0.113.9:31330"
    assert probe_target("[2001:db8::5]:31330", "2001:db8::5", **private) == "[2001:db8::5]:31330"
    assert probe_target("not an address", "203.0.113.5", **private) is None
    # Outside a private swarm: only a public source, never loopback (relayed connections come from there).
    assert probe_target("8.8.4.4:31330", "8.8.4.4") == "8.8.4.4:31330"
    assert probe_target("8.8.4.4:31330", "127.0.0.1") is None
    assert probe_target("127.0.0.1:22", "127.0.0.1") is None
    assert probe_target("192.168.1.20:31330", "192.168.1.20") is None
    assert probe_target("[fe80::1]:31330", "fe80::1") is None


def test_advice_names_the_port_to_forward_and_the_public_address() -> None:
    verdict = Verdict(False, "192.168.1.20:31330", (_result(False, observed="203.0.113.5"),
                                                    _result(False, observed="127.0.0.1")))
    text = advice(verdict, bound_port=31331, announce_host="192.168.1.20", announce_port=31330)
    assert "forward TCP port 31330 on your router to port 31331" in text
    assert "--announce-host 203.0.113.5" in text and "127.0.0.1" not in text
    assert "relay" in text
    assert "0 of 2 peers could connect" in verdict.summary() and "refused" in verdict.summary()
    assert "no other peer to ask" in Verdict(None, "a:1").summary()


def test_probers_and_relays_are_direct_online_peers() -> None:
    records = [record(0), record(1, relay=IDS[0].peer_id, reachable=False), record(2, reachable=False),
               record(3, state="leaving")]
    assert [r.peer_id for r in choose_probers(records, "me", random.Random(0))] == [IDS[0].peer_id]
    assert choose_probers(records, IDS[0].peer_id, random.Random(0)) == []
    relays = [record(0, relay_address="10.0.0.0:7000"), record(1, relay_address="10.0.0.1:7000", reachable=False),
              record(2), record(3, relay_address="10.0.0.3:7000", relay=IDS[0].peer_id)]
    assert [r.peer_id for r in relay_candidates(relays, "me")] == [IDS[0].peer_id]
    assert relay_candidates(relays, IDS[0].peer_id) == []


# -- relay caps ---------------------------------------------------------------------------------------
def test_byte_budget_is_per_clock_hour() -> None:
    now = [7200.0]
    budget = _ByteBudget(1000, lambda: now[0])
    assert budget.charge(600) and not budget.exhausted()
    assert not budget.charge(600) and budget.exhausted()
    now[0] += 3600
    assert not budget.exhausted() and budget.charge(900)
    assert _ByteBudget(0, lambda: 0.0).charge(10**12)  # 0 = no cap


# -- records ----------------------------------------------------------------------------------------
def test_relay_fields_are_signed_checked_and_optional() -> None:
    identity = IDS[0]
    relayed = record(0, relay=IDS[1].peer_id, reachable=False)
    assert check_signed(sign(relayed, identity), PeerRecord).relay_peer_id == IDS[1].peer_id
    relay = record(0, relay_address="10.0.0.0:7000", reachable=True)
    assert check_signed(sign(relay, identity), PeerRecord).relay_address == "10.0.0.0:7000"
    with pytest.raises(RecordError, match="relay_address"):
        check_signed(sign(record(0, relay_address="nowhere"), identity), PeerRecord)
    old = sign(record(0), identity)  # a peer of an older version announces no relay fields at all
    del old["fields"]["relay_address"]
    old["signature"] = identity.sign(_canonical(old["fields"])).hex()
    assert check_signed(old, PeerRecord).relay_address == ""


def test_clients_skip_unreachable_peers_without_a_relay() -> None:
    # The test records carry no certificate.
    swarm = RemoteSwarm(ClientConfig(allow_insecure=True), "m", 4, hidden_size=64)
    assert swarm._usable(record(0, reachable=False, relay=IDS[1].peer_id))
    assert not swarm._usable(record(0, reachable=False))
    assert swarm._usable(record(0, reachable=None)) and swarm._usable(record(0, reachable=True))


# -- route costs --------------------------------------------------------------------------------------
def test_an_unmeasured_relayed_peer_costs_the_relay_leg_and_direct_wins_ties() -> None:
    direct, relayed = record(0), record(1, relay=IDS[2].peer_id, reachable=False)
    costs = RouteCosts()
    for seed in range(20):  # at equal measured cost the direct peer is always chosen
        measured = RouteCosts(rtt_ms={direct.peer_id: 10.0, relayed.peer_id: 10.0}, slack=0.2)
        assert find_route([relayed, direct], 0, 4, costs=measured, rng=random.Random(seed))[0].peer == direct
    only = find_route([relayed], 0, 4, costs=costs)
    assert only[0].peer == relayed  # still used when nothing else serves the layers
    extra = route_ms(only, [relayed], costs) - route_ms(find_route([direct], 0, 4, costs=costs), [direct], costs)
    assert extra == pytest.approx(costs.relay_hop_ms)
    # Measured, the round trip already includes the relay: a fast relayed peer beats a slow direct one.
    fast_relayed = RouteCosts(rtt_ms={direct.peer_id: 80.0, relayed.peer_id: 15.0})
    assert find_route([relayed, direct], 0, 4, costs=fast_relayed)[0].peer == relayed
