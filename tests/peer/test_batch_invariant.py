"""Batch-invariant mode: each pass computes one step, in chunks that do not depend on the peer's load.

Why it matters: a matmul rounds a row differently with another number of rows beside it (shown
below on this machine's CPU), so a step batched with other sessions' steps, or a replay that merges
decode steps, gets other floats than the original. The bit-exact replay itself runs on real peers in
``tests/client/test_failover.py``.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from brigade.client.chunks import replay_pieces
from brigade.peer.executor import SpanExecutor
from brigade.peer.scheduler import INVARIANT_CHUNK_TOKENS, WorkItem, plan_batch


class _RecordingSpan:
    """A span that records the rows of every pass (per segment) and waits at a gate before the first."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.passes: list[list[int]] = []

    def forward_segments(self, segments: list, layers: tuple[int, int]) -> list[torch.Tensor]:
        self.gate.wait(10)
        self.passes.append([segment.hidden.shape[1] for segment in segments])
        return [segment.hidden for segment in segments]


def _session() -> SimpleNamespace:
    return SimpleNamespace(cache=None, closed=False)  # a session without a cache (the span has none)


def _item(positions: int, session: object | None = None) -> WorkItem:
    return WorkItem(hidden=torch.zeros(1, positions, 8), pad_lengths=torch.zeros(1, dtype=torch.long), layers=(0, 1),
                    session=session, chunk_tokens=128, client="c")


def test_a_matmul_row_depends_on_the_rows_beside_it() -> None:
    """The premise: if this ever holds exactly, batching would be invariant by itself (and this mode moot)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 688, bias=False)
    rows = torch.randn(64, 256)
    with torch.no_grad():
        together = layer(rows)
        differs = [m for m in (1, 2, 3, 4, 5, 8) if not torch.equal(layer(rows[:m]), together[:m])]
    if not differs:
        pytest.skip("this machine's matmul happens to be row-invariant: the mode holds, its premise is moot here")


def _named(plan: list[tuple[WorkItem, int]], names: dict[int, str]) -> list[tuple[str, int]]:
    return [(names[id(item)], positions) for item, positions in plan]


def test_the_plan_is_the_oldest_step_alone_in_fixed_chunks() -> None:
    decode, prefill, later = _item(1, _session()), _item(1300, _session()), _item(1, _session())
    decode.enqueued_at, prefill.enqueued_at, later.enqueued_at = 2.0, 1.0, 3.0
    ready, names = [decode, prefill, later], {id(decode): "decode", id(prefill): "prefill", id(later): "later"}
    assert _named(plan_batch(ready, 4096, invariant=True), names) == [("prefill", INVARIANT_CHUNK_TOKENS)]
    prefill.done = 1024  # its last chunk: what is left, whatever the budget or --prefill-chunk-tokens
    assert _named(plan_batch(ready, 8, invariant=True), names) == [("prefill", 1300 - 1024)]
    prefill.done = 0  # the default mode batches all three, and chunks the prefill at its 128
    assert sorted(_named(plan_batch(ready, 4096), names)) == [("decode", 1), ("later", 1), ("prefill", 128)]


def _passes(invariant: bool) -> list[list[int]]:
    span = _RecordingSpan()
    executor = SpanExecutor(span, torch.float32, "cpu", batch_window_s=0.05,  # type: ignore[arg-type]
                            batch_invariant=invariant)
    try:
        first = _item(1, _session())
        executor.submit(first)
        deadline = time.monotonic() + 5
        while first.started_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for item in [_item(1, _session()), _item(1, _session()), _item(600, _session())]:
            executor.submit(item)
        span.gate.set()
        deadline = time.monotonic() + 5
        while executor.queued and time.monotonic() < deadline:
            time.sleep(0.01)
        return span.passes
    finally:
        span.gate.set()
        executor.close()


def test_the_executor_computes_one_step_per_pass_only_in_batch_invariant_mode() -> None:
    assert _passes(invariant=True) == [[1], [1], [1], [512], [88]]
    default = _passes(invariant=False)
    assert [1, 1, 128] in default  # two decode steps and a prefill chunk of three sessions in one pass


def test_a_long_prefill_does_not_starve_decode_steps_and_a_stateless_pass_goes_whole() -> None:
    prefill, first_decode, second_decode = _item(4096, _session()), _item(1, _session()), _item(1, _session())
    prefill.enqueued_at, first_decode.enqueued_at, second_decode.enqueued_at = 1.0, 2.0, 3.0
    names = {id(prefill): "prefill", id(first_decode): "first", id(second_decode): "second"}
    order = []
    ready = [prefill, first_decode, second_decode]
    for turn in range(4):
        (item, positions), = plan_batch(ready, 2048, invariant=True)
        order.append((names[id(item)], positions))
        item.done += positions
        item.turn_at = 10.0 + turn  # what the executor records after each pass
        ready = [entry for entry in ready if entry.remaining > 0]
    assert order == [("prefill", 512), ("first", 1), ("second", 1), ("prefill", 512)]
    stateless = _item(600)  # a Forward: no session, no cache to continue, its answer is the whole pass
    (item, positions), = plan_batch([stateless], 2048, invariant=True)
    assert item is stateless and positions == 600


def test_a_stateless_pass_longer_than_a_chunk_runs_whole_on_a_batch_invariant_executor() -> None:
    span = _RecordingSpan()
    span.gate.set()
    executor = SpanExecutor(span, torch.float32, "cpu", batch_invariant=True)  # type: ignore[arg-type]
    try:
        forward = _item(600)  # a Forward: no session; its answer must be all 600 positions at once
        executor.submit(forward)
        deadline = time.monotonic() + 5
        while executor.queued and time.monotonic() < deadline:
            time.sleep(0.01)
        assert span.passes == [[600]]
    finally:
        executor.close()


def test_batch_invariant_replays_send_every_original_step_alone() -> None:
    starts = [0, 7, 8, 9, 10, 13, 14]  # a 7-position prompt, 3 decode steps, a 3-token draft, a decode step
    assert replay_pieces(starts, 15, 100) == [(0, 7), (7, 10), (10, 13), (13, 15)]
    assert replay_pieces(starts, 15, 100, merge_decode=False) == [
        (0, 7), (7, 8), (8, 9), (9, 10), (10, 13), (13, 14), (14, 15)]


def test_the_flag_is_announced_and_batch_invariant_clients_use_only_such_peers() -> None:
    """(The flag itself reaches real peers in tests/client/test_failover.py: its batch-invariant client
    would find no usable peer otherwise.)"""
    from brigade.client.config import ClientConfig
    from brigade.client.remote import RemoteSwarm
    from brigade.protocol.identity import Identity
    from brigade.protocol.records import PeerRecord, check_signed, sign

    identity = Identity.generate()
    fields = dict(peer_id=identity.peer_id, public_key=identity.public_key.hex(), address="10.0.0.1:5000",
                  model_name="m", start_layer=0, end_layer=4, num_layers=4, dtype="float32", signed_at=100.0,
                  expires_at=120.0)
    invariant = check_signed(sign(PeerRecord(**fields, batch_invariant=True), identity), PeerRecord)
    plain = check_signed(sign(PeerRecord(**fields), identity), PeerRecord)
    assert invariant.batch_invariant and not plain.batch_invariant
    strict = RemoteSwarm(ClientConfig(allow_insecure=True, batch_invariant=True), "m", 4, hidden_size=64)
    anyone = RemoteSwarm(ClientConfig(allow_insecure=True), "m", 4, hidden_size=64)
    assert strict._usable(invariant) and not strict._usable(plain)
    assert anyone._usable(invariant) and anyone._usable(plain)
