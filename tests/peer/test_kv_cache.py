"""One KV cache manager pays for every byte a session holds: ``allocate`` says None when it cannot, and
the session code decides what that means (a new session waits, then is refused; a step is refused
at once); kept outputs are paid from the same pool and the same client share, and freed with the
session. The first tests drive the manager and the session code directly; the last ones a real peer.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from brigade_peer_client import open_session, peer_stub
from brigade_testkit import PEER_THREADS, build_model

from brigade.deploy.launcher import LocalSwarm
from brigade.kernels.families import model_args
from brigade.kernels.memory import kv_bytes_per_token
from brigade.peer.config import PeerConfig
from brigade.peer.kv_cache import Allocation, KVCacheManager, Shortfall
from brigade.peer.outputs import OutputHistory
from brigade.peer.sessions import SessionManager
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.errors import CacheFullError, QuotaExceededError
from brigade.protocol.identity import Identity
from brigade.protocol.messages import OpenSession
from brigade.protocol.tensors import encode

PAGE = 64
HIDDEN = 64  # the tiny models' hidden size


def _manager(family: str = "llama", *, pool: int = 256, share: float = 1.0, layers: int = 6) -> SessionManager:
    config = PeerConfig(model="tiny", start_layer=0, end_layer=layers, cache_tokens=pool, client_cache_share=share)
    return SessionManager(config, model_args(build_model(family).config), torch.float32, "cpu")


def _request(name: str, *, max_length: int = 512, wait_s: float = 0.0, keep_outputs: bool = False,
             layers: int = 6) -> OpenSession:
    return OpenSession(session_id=name, start_layer=0, end_layer=layers, batch_size=1, max_length=max_length,
                       pad_lengths=(0,), open_timeout_s=wait_s, keep_outputs=keep_outputs)


def _compute(manager: SessionManager, session, length: int) -> None:  # type: ignore[no-untyped-def]
    """What the servicer and the compute thread do for a step reaching ``length``: pay, then grow and fill."""
    capacity = manager.prepare_step(session, session.length, length - session.length)
    session.cache.grow(capacity)
    session.cache.length = length


# -- the manager alone ---------------------------------------------------------------------------
def test_allocate_grants_pages_until_the_pool_is_full_then_says_none() -> None:
    manager = KVCacheManager(4 * PAGE, PAGE, position_bytes=16)
    first, second = Allocation("a"), Allocation("b")
    assert manager.allocate(first, cache_pages=3) is not None
    assert manager.allocate(second, cache_pages=1, output_pages=1) is None  # no exception: the caller decides
    assert manager.shortfall(second, 2) is Shortfall.POOL
    assert (second.pages, manager.free_tokens) == (0, PAGE)  # a refused grant takes nothing
    granted = manager.allocate(second, output_pages=1)
    assert granted is not None and (granted.cache, granted.outputs) == (0, 1)
    assert manager.free_tokens == 0 and manager.usage("b") == (1, PAGE)
    assert manager.free(first) == 3 and manager.free_tokens == 3 * PAGE
    manager.free(second)
    assert manager.books() == {} and manager.free_tokens == 4 * PAGE


def test_a_share_and_a_session_cap_per_owner_refuse_before_the_pool_does() -> None:
    manager = KVCacheManager(8 * PAGE, PAGE, position_bytes=16, client_share=0.25, max_sessions_per_client=2)
    mine = Allocation("client")
    assert manager.allocate(mine, cache_pages=1, output_pages=1) is not None  # its whole share: 2 of 8 pages
    assert manager.allocate(mine, output_pages=1) is None
    assert manager.shortfall(mine, 1) is Shortfall.SHARE
    assert manager.allocate(Allocation("client"), cache_pages=0) is not None  # a second session, no pages
    assert manager.shortfall(Allocation("client"), 0) is Shortfall.SESSIONS
    assert manager.allocate(Allocation(""), cache_pages=6) is not None  # anonymous: the pool alone limits it


# -- what the session code answers -------------------------------------------------------------------
def test_a_new_session_waits_for_pages_then_is_refused_with_what_is_free() -> None:
    async def scenario() -> None:
        manager = _manager(pool=2 * PAGE)
        big = await manager.open(_request("session-big"))
        manager.prepare_step(big, 0, 2 * PAGE)  # the whole pool
        began = time.monotonic()
        with pytest.raises(CacheFullError) as caught:
            await manager.open(_request("session-late", wait_s=0.3))
        assert time.monotonic() - began >= 0.25, "it should have waited for its open_timeout_s"
        assert type(caught.value) is CacheFullError and f"0 of {2 * PAGE} are free" in str(caught.value)

        async def close_soon() -> None:
            await asyncio.sleep(0.1)
            manager.close("session-big")

        closer = asyncio.create_task(close_soon())
        late = await manager.open(_request("session-late", wait_s=5.0))  # admitted once the big one closes
        await closer
        assert late.allocation.cache_pages == 1

    asyncio.run(scenario())


def test_a_step_that_cannot_grow_is_refused_at_once() -> None:
    async def scenario() -> None:
        manager = _manager(pool=2 * PAGE)
        first, second = await manager.open(_request("session-a")), await manager.open(_request("session-b"))
        _compute(manager, first, PAGE)
        with pytest.raises(CacheFullError, match=f"0 of {2 * PAGE} are free"):
            manager.prepare_step(first, PAGE, 1)
        assert first.paid_capacity == PAGE and second.allocation.cache_pages == 1  # nothing changed

    asyncio.run(scenario())


def test_kept_outputs_are_paid_from_the_pool_and_freed_with_the_session() -> None:
    """A windowed model's cache stays one page however long the session; its kept outputs do not."""

    async def scenario() -> None:
        manager = _manager("mistral_window", pool=8 * PAGE)
        page_bytes = PAGE * kv_bytes_per_token(manager.args, 4, 6)
        session = await manager.open(_request("session-kept", keep_outputs=True))
        assert (session.allocation.cache_pages, session.allocation.output_pages) == (1, 1)
        manager.prepare_step(session, 0, 512)
        outputs = session.outputs
        assert outputs is not None
        needed = 512 * HIDDEN * 4
        assert session.allocation.cache_pages == 1  # the ring
        assert session.allocation.output_pages == -(-needed // page_bytes) > 1
        assert manager.kv.free_tokens == (8 - session.allocation.pages) * PAGE
        outputs.write(0, torch.randn(1, 512, HIDDEN))
        assert outputs.nbytes() <= outputs.paid_bytes
        manager.close("session-kept")
        assert manager.kv.free_tokens == 8 * PAGE and manager.kv.books() == {}

    asyncio.run(scenario())


def test_kept_outputs_never_grow_past_what_was_paid() -> None:
    history = OutputHistory(1, HIDDEN, torch.float32, paid_bytes=10 * HIDDEN * 4)
    history.write(0, torch.randn(1, 10, HIDDEN))
    with pytest.raises(RuntimeError, match="not paid for"):
        history.write(10, torch.randn(1, 1, HIDDEN))
    history.write(0, torch.randn(1, 20, HIDDEN, dtype=torch.bfloat16))  # half the bytes per position
    assert history.nbytes() <= history.paid_bytes


def test_kept_outputs_count_against_the_clients_share() -> None:
    """One layer of the tiny Llama: a kept output costs what a cache position does. A share of two
    pages admits a plain session of 128 positions, but one keeping its outputs only up to 64."""

    async def scenario() -> None:
        manager = _manager(pool=8 * PAGE, share=0.25, layers=1)
        plain = await manager.open(_request("session-plain", layers=1), owner="client")
        assert manager.prepare_step(plain, 0, 2 * PAGE) == 2 * PAGE
        manager.close("session-plain")
        kept = await manager.open(_request("session-kept", layers=1, keep_outputs=True), owner="client")
        assert manager.owner_usage("client") == (1, 2 * PAGE)  # a cache page and an output page
        manager.prepare_step(kept, 0, PAGE)
        with pytest.raises(QuotaExceededError, match=r"more than its share \(25%\)"):
            manager.prepare_step(kept, 0, PAGE + 1)
        with pytest.raises(QuotaExceededError, match="share"):  # a second one is refused at open
            await manager.open(_request("session-kept-2", layers=1, keep_outputs=True), owner="client")

    asyncio.run(scenario())


# -- a real peer -----------------------------------------------------------------------------------
POOL = 8 * PAGE


@pytest.fixture(scope="module")
def peer(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One layer of the tiny Llama (a kept output costs what a cache position does), 8 pages, 2 per client."""
    with LocalSwarm(tmp_path_factory.mktemp("kv-cache"), peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        launched = swarm.add_peer(str(llama_checkpoint), (0, 1), extra_args=[
            "--cache-tokens", str(POOL), "--client-cache-share", "0.25", "--drain-grace", "1"])
        yield launched.info


class _Stream:
    """A hand-driven session: open, then steps, each answer read (or the refusal raised)."""

    def __init__(self, stub: pb_grpc.PeerStub, info: dict[str, object], name: str, identity: Identity,
                 keep_outputs: bool):
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue(16)
        self.name = name
        self._responses = stub.Inference(iter(self._requests.get, None), timeout=60)
        self._requests.put(open_session(info, name, identity=identity, start_layer=0, end_layer=1, batch_size=1,
                                        max_length=256, keep_outputs=keep_outputs))
        next(self._responses)

    def step(self, start: int, positions: int) -> int:
        self._requests.put(pb.InferenceRequest(session_id=self.name, step=pb.Step(
            hidden=encode(torch.randn(1, positions, HIDDEN)), start_position=start)))
        return next(self._responses).result.length

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._responses:
            pass


def _free(stub: pb_grpc.PeerStub, expected: int) -> None:
    deadline = time.monotonic() + 5.0
    while (free := stub.Info(pb.InfoRequest(), timeout=10).free_cache_tokens) != expected:
        assert time.monotonic() < deadline, f"free cache stayed at {free}, expected {expected}"
        time.sleep(0.05)


def test_a_peer_counts_kept_outputs_in_the_share_and_frees_them_with_the_session(peer: dict[str, object]) -> None:
    client = Identity.generate()
    channel, stub = peer_stub(peer)
    with channel:
        plain = _Stream(stub, peer, "session-plain", client, keep_outputs=False)
        assert plain.step(0, 2 * PAGE) == 2 * PAGE  # the whole share, in cache
        plain.close()
        _free(stub, POOL)

        kept = _Stream(stub, peer, "session-kept", client, keep_outputs=True)
        _free(stub, POOL - 2 * PAGE)  # its first cache page and its first page of kept outputs
        assert kept.step(0, PAGE) == PAGE
        with pytest.raises(grpc.RpcError) as caught:
            kept.step(PAGE, 1)  # a second page of cache, and one of outputs: past its share
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than its share (25%)" in (caught.value.details() or ""), caught.value.details()
        _free(stub, POOL)  # the refused stream ended: its cache and its kept outputs are back
