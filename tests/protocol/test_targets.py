"""Which addresses are dialed on others' word, what makes a swarm private, and the bounded channel cache."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from brigade.peer.config import PeerConfig
from brigade.protocol.channel_cache import ChannelCache, DialKey
from brigade.protocol.targets import ForbiddenTargetError, dial_target, joins_privately, literal_allowed

BOOT = "/ip4/{}/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_a_swarm_is_private_only_when_joined_through_private_addresses() -> None:
    assert joins_privately([BOOT.format("127.0.0.1")], ())
    assert joins_privately([BOOT.format("192.168.1.4"), BOOT.format("10.0.0.2")], ())
    assert not joins_privately([BOOT.format("127.0.0.1"), BOOT.format("8.8.8.8")], ())
    assert not joins_privately(["/dns4/boot.example.org/tcp/31337/p2p/Qm"], ())  # a name: the public swarm
    assert joins_privately([], ["127.0.0.1"]) and not joins_privately([], ["0.0.0.0"])
    assert PeerConfig(model="m", initial_peers=(BOOT.format("127.0.0.1"),)).allows_private_targets
    assert not PeerConfig(model="m", initial_peers=(BOOT.format("127.0.0.1"),),
                          private_swarm=False).allows_private_targets
    assert not PeerConfig(model="m", host="0.0.0.0").allows_private_targets


@pytest.mark.parametrize("address", ["127.0.0.1:22", "10.1.2.3:80", "[::1]:8080", "169.254.169.254:80",
                                     "[fe80::1]:22", "192.168.0.1:443", "[::ffff:127.0.0.1]:22", "0.0.0.0:80",
                                     "localhost:22", "not an address"])
def test_private_targets_are_refused_outside_a_private_swarm(address: str) -> None:
    with pytest.raises(ForbiddenTargetError):
        asyncio.run(dial_target(address, allow_private=False))
    assert not literal_allowed(address, allow_private=False) or address.startswith("localhost")


def test_public_targets_and_private_swarms_dial_as_given() -> None:
    assert asyncio.run(dial_target("8.8.8.8:443", allow_private=False)) == "8.8.8.8:443"
    assert asyncio.run(dial_target("127.0.0.1:22", allow_private=True)) == "127.0.0.1:22"
    assert literal_allowed("8.8.8.8:443", allow_private=False) and literal_allowed("[::1]:1", allow_private=True)


@pytest.mark.parametrize("address", ["169.254.169.254:80", "[fe80::1]:22", "[::ffff:169.254.169.254]:80"])
def test_link_local_targets_are_refused_even_in_a_private_swarm(address: str) -> None:
    """A record naming the cloud metadata service must not make a peer of a private VPC swarm dial it."""
    with pytest.raises(ForbiddenTargetError, match="link-local"):
        asyncio.run(dial_target(address, allow_private=True))
    assert not literal_allowed(address, allow_private=True)


def test_the_channel_cache_keys_by_the_whole_dial_and_evicts_the_oldest() -> None:
    async def scenario() -> None:
        cache = ChannelCache(2, evict_grace_s=0.0)
        made: list[grpc.aio.Channel] = []

        def dial() -> grpc.aio.Channel:
            made.append(grpc.aio.insecure_channel("127.0.0.1:9"))
            return made[-1]

        direct = DialKey("peer-a", "127.0.0.1:9", "cert", "pin", "")
        relayed = DialKey("peer-b", "127.0.0.1:9", "cert", "pin", "relay")
        assert cache.get(direct, dial) is cache.get(direct, dial)
        assert cache.get(relayed, dial) is not cache.get(direct, dial)  # same address and pin, another dial
        cache.get(DialKey("peer-c", "127.0.0.1:9", "cert", "pin", ""), dial)  # evicts peer-b's (least recent)
        assert len(cache) == 2 and len(made) == 3
        await asyncio.sleep(0.1)
        assert made[1].get_state() == grpc.ChannelConnectivity.SHUTDOWN
        assert cache.get(direct, dial).channel is made[0]
        await cache.close()

    asyncio.run(scenario())
