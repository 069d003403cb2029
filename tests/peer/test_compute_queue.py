"""The compute queue is bounded overall and per client, and drops work nobody waits for.

In process, over a fake span whose passes wait for the test: what is queued is then known exactly.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from brigade.peer.executor import SpanExecutor
from brigade.peer.limits import ClientSlots, ComputeBusyError
from brigade.peer.scheduler import WorkItem


class _GatedSpan:
    """A span whose every pass waits until the test opens the gate; counts the positions it computed."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.positions = 0

    def forward_segments(self, segments: list, layers: tuple[int, int]) -> list[torch.Tensor]:
        self.gate.wait(10)
        self.positions += sum(segment.hidden.shape[1] for segment in segments)
        return [segment.hidden for segment in segments]


def _item(client: str, positions: int = 4, session: object = None) -> WorkItem:
    return WorkItem(hidden=torch.zeros(1, positions, 8), pad_lengths=torch.zeros(1, dtype=torch.long), layers=(0, 1),
                    client=client, session=session)


def _wait_for(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_queue_refuses_past_its_bounds_and_drops_abandoned_work() -> None:
    span = _GatedSpan()
    executor = SpanExecutor(span, torch.float32, "cpu", max_queued=6, max_queued_per_client=3,  # type: ignore[arg-type]
                            batch_window_s=0)
    try:
        first = _item("a")
        executor.submit(first)  # the pass that holds the gate
        _wait_for(lambda: first.started_at is not None)
        mine = [_item("a"), _item("a")]
        for item in mine:
            executor.submit(item)
        with pytest.raises(ComputeBusyError) as caught:
            executor.submit(_item("a"))
        assert caught.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED and "its limit" in str(caught.value)
        closed = SimpleNamespace(closed=False)
        others = [_item("b", session=closed), _item("c"), _item("c")]
        for item in others:
            executor.submit(item)
        with pytest.raises(ComputeBusyError, match="queue is full"):
            executor.submit(_item("d"))
        mine[0].cancelled = True  # its call ended
        closed.closed = True  # its session was closed
        span.gate.set()
        _wait_for(lambda: executor.queued == 0)
        assert executor.dropped_items == 2
        assert span.positions == 4 * 4  # first, mine[1], and the two of "c": nothing of the abandoned two
        executor.submit(_item("a"))  # room again
        _wait_for(lambda: executor.queued == 0)
    finally:
        span.gate.set()
        executor.close()


def test_client_slots_bound_calls_in_flight_per_client() -> None:
    slots = ClientSlots("Forward", per_client=2)
    with slots.hold("a"), slots.hold("a"):
        with pytest.raises(ComputeBusyError):
            with slots.hold("a"):
                pass
        with slots.hold("b"):
            assert slots.held("b") == 1
    assert (slots.held("a"), slots.held("b")) == (0, 0)
