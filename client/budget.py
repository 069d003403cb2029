"""How much recovering one piece of work may still do: the one retry budget of sessions and stateless passes."""

from __future__ import annotations

import time

from brigade.protocol.errors import BrigadeError


class RecoveryExhaustedError(BrigadeError):
    """A step or pass could not recover from failed hops within the retry budget."""


class Budget:
    """Attempts and seconds left for recovering; ``spend`` raises ``RecoveryExhaustedError`` (from the last
    failure) once out.

    The seconds count from the first failure, not from the start of
    the work: a hop that hangs is noticed only at its deadline, which for a long prefill (the step deadline,
    120 s) is longer than the whole budget (60 s). Counting from the start would let one hung or silent
    peer end the user's generation on the spot instead of being routed around. Each wait is bounded by its
    own deadline and failures by ``attempts``, so the work as a whole stays bounded.
    """

    def __init__(self, seconds: float, attempts: int):
        self.seconds = seconds
        self.deadline: float | None = None  # set by the first failure
        self.attempts_left = attempts

    def start(self) -> None:
        """Starts the clock (once): recovery begins now."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds

    def remaining_s(self) -> float:
        return self.seconds if self.deadline is None else self.deadline - time.monotonic()

    def spend(self, error: Exception) -> None:
        self.start()
        self.attempts_left -= 1
        if self.attempts_left < 0 or self.remaining_s() <= 0:
            raise RecoveryExhaustedError(f"gave up after repeated failures; last: {error}") from error
