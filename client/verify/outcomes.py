"""What result checks produce: per-session counts, per-check results, evidence reports, and how a check ends."""

from __future__ import annotations

from dataclasses import dataclass, field

from brigade.protocol import brigade_pb2 as pb


@dataclass
class VerificationStats:
    """What the checks of one session did; counts are per hop check unless marked per window."""

    windows: int = 0  # finished windows
    due: int = 0  # windows chosen for checking
    compared: int = 0  # hop checks that got as far as comparing two results
    passed: int = 0
    caught: int = 0  # verdicts that dropped a peer (outvoted or self-contradicting)
    unresolved: int = 0  # disagreements a third peer could not settle (or no third peer)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> hop checks ("busy", "cancelled": windows)
    rerun_positions: int = 0  # positions (all sequences) recomputed by other peers: the compute overhead
    seconds: float = 0.0  # wall time spent in checks, off the session's critical path

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count


@dataclass
class CheckResult:
    """One hop check's outcome (for tests, benchmarks and logs)."""

    peer_id: str
    precision: str
    layers: tuple[int, int]
    window: tuple[int, int]
    outcome: str = ""  # "passed" | "caught" | "unresolved" | "skipped:<reason>"
    checker: str = ""  # "peer_id(precision)" of the re-running peer
    third: str = ""  # ... and of the one that settled a disagreement
    scores: dict[str, float] = field(default_factory=dict)  # "suspect/checker" etc. -> score (above 1 disagrees)
    accused: list[str] = field(default_factory=list)  # whom a "caught" dropped (the re-running peer, possibly)
    seconds: float = 0.0


@dataclass
class VerificationReport:
    """Evidence that a peer returned wrong results: what it signed, and what others signed instead."""

    kind: str  # "outvoted": two peers agree against it; "contradiction": what it hands back is not what it
    # signed; "refused": it refused or stalled the read-back of its outputs (a check it dodged is a failed
    # one); "misattested": an attestation it signed names another session, layers, position or output
    # than the answer it came with (seen on arrival, by the session)
    accused: list[str]
    layers: tuple[int, int]
    window: tuple[int, int]
    session_id: str  # the accused's session on its peer (what its attestations name)
    detail: str
    scores: dict[str, float] = field(default_factory=dict)
    attestations: list[pb.Attestation] = field(default_factory=list)  # the accused's, for the positions involved
    witnesses: dict[str, list[pb.Attestation]] = field(default_factory=dict)  # other peer id -> its attestations


class Skip(Exception):
    """This hop's check cannot be made; ``reason`` names the counter it adds to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


class Verdict(Exception):
    """The check ended in a verdict already recorded on its result."""
