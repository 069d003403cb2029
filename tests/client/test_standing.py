"""The one owner of peer standing: bans back off and expire, leaving is remembered briefly, a
verdict excludes its peer from every route for good, and the evidence kept is bounded."""

from __future__ import annotations

from dataclasses import dataclass, field

from brigade.client.bans import PeerBans
from brigade.client.standing import LEAVING_MEMORY_S, MAX_REMEMBERED, MAX_REPORTS_KEPT, PeerStanding, TimedSet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Report:
    accused: list[str] = field(default_factory=list)


def standing_with(clock: Clock) -> PeerStanding:
    standing = PeerStanding(PeerBans(base_s=2.0, max_s=8.0, clock=clock))
    standing.leaving = TimedSet(LEAVING_MEMORY_S, clock=clock)
    return standing


def test_bans_double_up_to_their_cap_expire_and_are_forgiven() -> None:
    clock = Clock()
    standing = standing_with(clock)
    assert [standing.ban("a") for _ in range(5)] == [2.0, 4.0, 8.0, 8.0, 8.0]
    assert standing.excluded() == {"a"}
    clock.now += 8.1
    assert standing.excluded() == set()  # a restarted peer with the same id is usable again
    assert standing.ban("a") == 8.0  # ...but its record of failures stands until it succeeds
    standing.forgive("a")
    assert standing.excluded() == set() and standing.ban("a") == 2.0


def test_a_leaving_peer_is_avoided_briefly_and_never_banned() -> None:
    clock = Clock()
    standing = standing_with(clock)
    standing.mark_leaving("b")
    assert standing.excluded() == {"b"} and not standing.bans.is_banned("b")
    clock.now += LEAVING_MEMORY_S + 0.1
    assert standing.excluded() == set()


def test_a_verdict_excludes_its_peers_for_good_and_keeps_bounded_evidence() -> None:
    clock = Clock()
    standing = standing_with(clock)
    standing.distrust(Report(["c", "d"]))
    clock.now += 10_000
    assert standing.excluded() == {"c", "d"}
    for index in range(MAX_REPORTS_KEPT + 10):
        standing.distrust(Report([f"x{index}"]))
    assert len(standing.reports) == MAX_REPORTS_KEPT and standing.reports[-1].accused == [f"x{MAX_REPORTS_KEPT + 9}"]


def test_a_timed_set_forgets_its_oldest_past_its_bound() -> None:
    clock = Clock()
    remembered: TimedSet[int] = TimedSet(60.0, clock=clock)
    for member in range(MAX_REMEMBERED + 5):
        remembered.add(member)
    assert 0 not in remembered and MAX_REMEMBERED + 4 in remembered
    assert len(remembered.members()) == MAX_REMEMBERED
