"""Network profiles of the testbed: what a hop between a client and a peer looks like.

A profile's delays are round-trip times of one hop (client to peer and back), because that is
what a token pays per hop when the client drives the pipeline: the floor of a decode step is
the sum of its hops' round trips. The link emulation adds half of a hop's round trip in each
direction. Bandwidth is per host and per direction (a volunteer's access link).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from brigade.deploy.delay_proxy import LinkProfile


@dataclass(frozen=True)
class NetProfile:
    name: str
    rtt_ms: tuple[float, float]  # a peer's round trip is drawn uniformly from [low, high] (fixed per run)
    jitter_ms: float  # added per direction, uniform in [0, jitter_ms) (order is kept)
    bandwidth_mbit: float  # per host and direction, shaped by the kernel (tbf)
    # Expected stalls per second, per direction of each connection. The delay proxy charges the time
    # since a direction's last message, so a message waiting G seconds after the previous one stalls
    # with probability 1 - exp(-rate * G): at decode steps of 0.2 to 1.5 s, 0.2% to 1.5% of messages
    # on `internet`, 1% to 7% on `bad` (higher rates feed on themselves: stalls lengthen steps).
    stall_rate_per_s: float
    stall_ms: float  # how long a stall holds a direction (a retransmission seen from above TCP)
    loss_percent: float  # netem only: packet loss that makes TCP stall on its own (stands in for stalls)

    def hop_rtts(self, hops: int, seed: int) -> list[float]:
        """Round trips of ``hops`` peers, the same for the same seed (so benchmark runs compare)."""
        rng = random.Random(seed)
        low, high = self.rtt_ms
        return [round(rng.uniform(low, high), 1) if high > low else low for _ in range(hops)]

    def link(self, rtt_ms: float) -> LinkProfile:
        """One direction of a hop with this round trip, for the delay proxy (bandwidth is tbf's job)."""
        return LinkProfile(
            delay_ms=rtt_ms / 2, jitter_ms=self.jitter_ms,
            stall_rate_per_s=self.stall_rate_per_s, stall_ms=self.stall_ms,
        )


PROFILES: dict[str, NetProfile] = {
    profile.name: profile
    for profile in (
        NetProfile("lan", rtt_ms=(1.0, 1.0), jitter_ms=0.0, bandwidth_mbit=1000.0,
                   stall_rate_per_s=0.0, stall_ms=0.0, loss_percent=0.0),
        NetProfile("internet", rtt_ms=(25.0, 80.0), jitter_ms=2.0, bandwidth_mbit=100.0,
                   stall_rate_per_s=0.01, stall_ms=200.0, loss_percent=0.01),
        NetProfile("bad", rtt_ms=(150.0, 150.0), jitter_ms=10.0, bandwidth_mbit=10.0,
                   stall_rate_per_s=0.05, stall_ms=300.0, loss_percent=1.0),
    )
}


def get_profile(name: str) -> NetProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None
