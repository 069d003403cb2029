"""A sliding-window model's sessions take cache pages for their window, not for their length."""

from __future__ import annotations

import asyncio

import torch
from brigade_testkit import WINDOW, build_model

from brigade.kernels.cache import ring_size
from brigade.kernels.families import model_args
from brigade.peer.config import PeerConfig
from brigade.peer.sessions import SessionManager
from brigade.protocol.errors import CacheFullError
from brigade.protocol.messages import OpenSession

POOL = 256  # positions: 4 pages of 64
LENGTH = 512  # the tiny models' max_position_embeddings


def _manager(family: str) -> SessionManager:
    config = PeerConfig(model="tiny", start_layer=0, end_layer=6, cache_tokens=POOL)
    return SessionManager(config, model_args(build_model(family).config), torch.float32, "cpu")


def _open(index: int) -> OpenSession:
    return OpenSession(session_id=f"session-{index:04d}", start_layer=0, end_layer=6, batch_size=1,
                       max_length=LENGTH, pad_lengths=(0,), open_timeout_s=0.0)


def _grow_to(manager: SessionManager, session, length: int) -> None:
    """What the servicer and executor do for a step reaching ``length``: pay, then grow the buffers."""
    capacity = manager.prepare_step(session, session.length, length - session.length)
    session.cache.grow(capacity)
    session.cache.length = length


def test_windowed_sessions_of_full_length_share_a_pool_too_small_for_one_full_attention_session() -> None:
    async def scenario() -> None:
        windowed = _manager("mistral_window")
        sessions = [await windowed.open(_open(index)) for index in range(POOL // 64)]
        for session in sessions:
            _grow_to(windowed, session, LENGTH)
            assert session.allocation.cache_pages == 1  # the ring (15 slots) fits one page
            assert all(keys.shape[2] == ring_size(WINDOW) for keys in session.cache.keys)
        assert windowed.kv.free_tokens == 0

        full = _manager("llama")
        session = await full.open(_open(0))
        try:
            _grow_to(full, session, LENGTH)
        except CacheFullError as error:
            assert "KV cache is full" in str(error)
        else:
            raise AssertionError("a full-attention session of 512 positions cannot fit a 256-position pool")

    asyncio.run(scenario())


def test_a_span_mixing_global_and_sliding_layers_pays_for_each_kind() -> None:
    async def scenario() -> None:
        manager = _manager("gemma2")  # layers alternate sliding and global
        session = await manager.open(_open(0))
        _grow_to(manager, session, 192)
        # Three global layers of 192 positions and three rings of 15, averaged over the six: 104 -> 2 pages.
        assert session.allocation.cache_pages == 2
        sizes = sorted({keys.shape[2] for keys in session.cache.keys})
        assert sizes == [ring_size(WINDOW), 192]

    asyncio.run(scenario())
