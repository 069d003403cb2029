"""How much recovering one piece of work may still do: the one retry budget of sessions and stateless passes."""

from __future__ import annotations

import time

from brigade.protocol.errors import BrigadeError


class RecoveryExhaustedError(BrigadeError):
    """A step or pass could not recover from failed hops within the retry budget."""


class Budget:
    """Attempts and seconds left; ``spend`` raises ``RecoveryExhaustedError`` (from the last failure) once out."""

    def __init__(self, seconds: float, attempts: int):
        self.deadline = time.monotonic() + seconds
        self.attempts_left = attempts

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def spend(self, error: Exception) -> None:
        self.attempts_left -= 1
        if self.attempts_left < 0 or self.remaining_s() <= 0:
            raise RecoveryExhaustedError(f"gave up after repeated failures; last: {error}") from error
