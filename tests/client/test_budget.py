"""The retry budget (``client/budget.py``) counts recovery, from the first failure on, not the work's own wait."""

from __future__ import annotations

import time

import pytest

from brigade.client.budget import Budget, RecoveryExhaustedError


def test_a_failure_noticed_after_longer_than_the_budget_still_gets_its_retries() -> None:
    budget = Budget(0.2, attempts=3)
    time.sleep(0.3)  # a hop that hung until its deadline, longer than the whole budget
    assert budget.remaining_s() == pytest.approx(0.2)
    budget.spend(RuntimeError("hung"))  # the clock starts here: a retry is still allowed
    assert 0 < budget.remaining_s() <= 0.2
    time.sleep(0.25)
    with pytest.raises(RecoveryExhaustedError, match="second"):
        budget.spend(RuntimeError("second"))


def test_attempts_bound_the_failures_and_a_started_clock_does_not_restart() -> None:
    budget = Budget(60.0, attempts=2)
    budget.spend(RuntimeError("one"))
    deadline = budget.deadline
    budget.start()
    assert budget.deadline == deadline
    budget.spend(RuntimeError("two"))
    with pytest.raises(RecoveryExhaustedError, match="three"):
        budget.spend(RuntimeError("three"))
