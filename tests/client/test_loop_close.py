"""Closing a client wakes every thread still waiting on it (``client/loop.py``): never a thread stuck on a
loop that has stopped, whether the work it waits for is parked on a network wait or blocks the loop itself."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from brigade.client.loop import ClientClosedError, LoopThread


def _wait_in_thread(loop: LoopThread, coroutine) -> tuple[threading.Thread, list[BaseException]]:  # type: ignore[no-untyped-def]
    raised: list[BaseException] = []

    def call() -> None:
        try:
            loop.run(coroutine)
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, raised


def test_a_caller_waiting_on_a_parked_step_wakes_when_the_client_closes() -> None:
    loop = LoopThread()
    cleaned = threading.Event()

    async def parked() -> None:  # a step waiting on a peer that never answers
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    thread, raised = _wait_in_thread(loop, parked())
    time.sleep(0.2)
    began = time.monotonic()
    loop.close()
    thread.join(10)
    assert not thread.is_alive(), "the caller still waits on a closed client"
    assert isinstance(raised[0], ClientClosedError) and cleaned.is_set()  # its clean-up ran
    assert time.monotonic() - began < 5
    with pytest.raises(ClientClosedError):
        loop.run(asyncio.sleep(0))


def test_a_caller_waiting_on_a_blocked_loop_wakes_when_the_client_closes() -> None:
    loop = LoopThread()

    async def blocking() -> None:  # something that blocks the loop thread itself
        time.sleep(12)

    thread, raised = _wait_in_thread(loop, blocking())
    time.sleep(0.2)
    loop.close()
    thread.join(2)
    assert not thread.is_alive(), "the caller still waits on a loop that cannot stop"
    assert isinstance(raised[0], ClientClosedError)


def test_a_call_past_its_own_timeout_still_times_out() -> None:
    loop = LoopThread()
    try:
        with pytest.raises(TimeoutError):
            loop.run(asyncio.sleep(5), timeout_s=0.3)
        assert loop.run(asyncio.sleep(0, result=7), timeout_s=2) == 7
    finally:
        loop.close()


def test_work_that_raises_timeout_error_raises_it_at_once() -> None:
    """A TimeoutError of the work itself (a DHT backstop, a file lock) is its result, not a poll to repeat."""
    loop = LoopThread()

    async def times_out() -> None:
        raise TimeoutError("the work's own")

    try:
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="the work's own"):
            loop.run(times_out())
        with pytest.raises(TimeoutError, match="the work's own"):
            loop.run(times_out(), timeout_s=30)
        assert time.monotonic() - began < 2
    finally:
        loop.close()
