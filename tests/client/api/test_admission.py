"""Admission: a bounded number running, a bounded FIFO line, a bounded wait, no lost turns."""

from __future__ import annotations

import asyncio

import pytest

from brigade.client.api.admission import Admission
from brigade.client.api.errors import ApiError


def test_turns_go_in_order_and_the_line_is_bounded() -> None:
    async def scenario() -> list[str]:
        admission = Admission(max_active=2, max_queued=2, queue_timeout_s=5)
        first, second = await admission.admit(), await admission.admit()
        order: list[str] = []

        async def wait(name: str) -> None:
            lease = await admission.admit()
            order.append(name)
            lease.release()

        waiters = [asyncio.create_task(wait("a")), asyncio.create_task(wait("b"))]
        await asyncio.sleep(0)
        assert admission.queued == 2
        with pytest.raises(ApiError) as full:
            await admission.admit()
        assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
        first.release()
        first.release()  # idempotent: one turn given back, not two
        await asyncio.sleep(0.01)
        second.release()
        await asyncio.gather(*waiters)
        assert (admission.active, admission.queued) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["a", "b"]


def test_a_wait_that_times_out_or_is_cancelled_loses_no_turn() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=1, max_queued=4, queue_timeout_s=0.05)
        held = await admission.admit()
        with pytest.raises(ApiError) as late:
            await admission.admit()
        assert late.value.status == 503
        cancelled = asyncio.create_task(admission.admit())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        held.release()
        assert (admission.active, admission.queued) == (0, 0)
        again = await asyncio.wait_for(admission.admit(), 1)
        again.release()
        assert admission.active == 0

    asyncio.run(scenario())
