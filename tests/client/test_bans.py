"""Per-peer backoff: bans double with each failure, are capped, expire, and success forgives."""

from __future__ import annotations

from brigade.client.bans import PeerBans


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bans_double_cap_and_expire() -> None:
    clock = Clock()
    bans = PeerBans(base_s=2.0, max_s=10.0, clock=clock)
    assert [bans.ban("a") for _ in range(4)] == [2.0, 4.0, 8.0, 10.0]
    assert bans.is_banned("a") and bans.banned() == {"a"}
    clock.now = 9.9
    assert bans.is_banned("a")
    clock.now = 10.1  # a peer that restarts with the same id is used again once its ban ends
    assert not bans.is_banned("a") and bans.banned() == set()
    assert bans.ban("a") == 10.0  # its failures are remembered until it serves well again


def test_success_forgives() -> None:
    clock = Clock()
    bans = PeerBans(base_s=1.0, max_s=60.0, clock=clock)
    bans.ban("b")
    bans.ban("b")
    bans.forgive("b")
    assert not bans.is_banned("b")
    assert bans.ban("b") == 1.0
