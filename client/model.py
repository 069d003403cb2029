"""``DistributedModelForCausalLM``: the synchronous facade of the client's async core.

The core (``client/core.py``, ``AsyncDistributedModelForCausalLM``) runs on a private event loop
thread; each method here waits on it with a deadline. ``generate`` mirrors transformers' (greedy
and sampling, batches with left padding, EOS handling) so the same call gives the same tokens.
Async code can use the core directly on its own loop, or ``astream`` here from any loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutput

from brigade.client.bans import PeerBans
from brigade.client.core import AsyncDistributedModelForCausalLM, left_pad_lengths
from brigade.client.loop import LoopThread
from brigade.client.recovery import FailoverEvent
from brigade.client.speculative import SpeculationStats
from brigade.client.verify.verifier import ResultVerifier

CLOSE_TIMEOUT_S = 15.0  # bound on closing a stream's session on every hop

__all__ = ["AsyncDistributedModelForCausalLM", "DistributedModelForCausalLM", "left_pad_lengths"]


class DistributedModelForCausalLM:
    """Use like a transformers causal LM; call ``close()`` (or use ``with``) when done."""

    def __init__(self, core: AsyncDistributedModelForCausalLM, loop: LoopThread):
        self.core = core
        self._loop = loop

    @classmethod
    def from_pretrained(cls, model: str, initial_peers: list[str] | tuple[str, ...] = (), *,
                        dtype: torch.dtype = torch.float32, revision: str | None = None,
                        **client_options: Any) -> DistributedModelForCausalLM:
        """Loads only the embeddings, final norm and LM head of ``model``, and joins the swarm."""
        loop = LoopThread()
        try:
            core = loop.run(AsyncDistributedModelForCausalLM.from_pretrained(
                model, initial_peers, dtype=dtype, revision=revision, **client_options))
        except BaseException:
            loop.close()
            raise
        return cls(core, loop)

    # -- what the core knows -----------------------------------------------------------------------
    config = property(lambda self: self.core.config)
    head = property(lambda self: self.core.head)
    swarm = property(lambda self: self.core.swarm)
    standing = property(lambda self: self.core.standing)
    client_config = property(lambda self: self.core.client_config)
    generation_config = property(lambda self: self.core.generation_config)
    model_name = property(lambda self: self.core.model_name)
    model_path = property(lambda self: self.core.model_path)

    @property
    def bans(self) -> PeerBans:
        return self.core.standing.bans

    @bans.setter
    def bans(self, bans: PeerBans) -> None:
        self.core.standing.bans = bans

    @property
    def distrusted(self) -> set[str]:
        """Peers a result check caught cheating: no session of this model uses them."""
        return self.core.standing.distrusted

    # Of the last generate / stream / forward (meaningless while several run at once).
    last_route = property(lambda self: self.core.last.route)
    last_events: list[FailoverEvent] = property(lambda self: self.core.last.events)  # type: ignore[assignment]
    last_forwarding = property(lambda self: self.core.last.forwarding)
    last_speculation: SpeculationStats | None = property(lambda self: self.core.last.speculation)  # type: ignore
    last_verifier: ResultVerifier | None = property(lambda self: self.core.last.verifier)  # type: ignore

    # -- calls ----------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """Full-sequence logits [B, T, V], like a transformers model's forward."""
        return self._loop.run(self.core.forward(input_ids, attention_mask))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, streamer: Any | None = None, **options: Any) -> torch.Tensor:
        """Prompt plus new tokens [B, T + n], as transformers' generate returns them."""
        if streamer is not None:
            streamer.put(input_ids.cpu())
        columns = []
        for tokens in self.stream(input_ids, attention_mask, max_new_tokens=max_new_tokens, **options):
            columns.append(tokens[:, None])
            if streamer is not None:
                streamer.put(tokens.cpu())
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, *columns], dim=1)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any,
               ) -> Iterator[torch.Tensor]:
        """Yields each new token [B] as soon as it is settled (the core's ``stream``, driven from here)."""
        tokens = self.core.stream(input_ids, attention_mask, **options)
        try:
            while True:
                try:
                    yield self._loop.run(_next(tokens))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(_close(tokens), CLOSE_TIMEOUT_S)

    async def astream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any,
                      ) -> AsyncIterator[torch.Tensor]:
        """``stream`` for async code on any event loop: each token is taken from the core's loop as it is asked
        for. Stopping early (``break``, ``aclose``) or a cancel closes the session before this returns."""
        tokens = self.core.stream(input_ids, attention_mask, **options)
        core_loop = self._loop.loop
        pending: concurrent.futures.Future[torch.Tensor] | None = None
        try:
            while True:
                pending = asyncio.run_coroutine_threadsafe(_next(tokens), core_loop)
                try:
                    token = await asyncio.wrap_future(pending)
                except StopAsyncIteration:
                    return
                yield token
        finally:
            if pending is not None and not pending.done():
                pending.cancel()  # the step in flight stops; the core's generator then closes its session
            closing = asyncio.run_coroutine_threadsafe(_close(tokens), core_loop)
            await asyncio.shield(asyncio.wait_for(asyncio.wrap_future(closing), CLOSE_TIMEOUT_S))

    def close(self) -> None:
        try:
            self._loop.run(self.core.close(), 30.0)
        finally:
            self._loop.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _next(tokens: AsyncIterator[torch.Tensor]) -> torch.Tensor:
    return await anext(tokens)


async def _close(tokens: AsyncGenerator[torch.Tensor, None]) -> None:
    """Closes the core's generator on its loop once no step of it is running (a cancelled one finishes its
    own clean-up first: aclose on a running generator would fail), which closes its session on every hop."""
    while tokens.ag_running:
        await asyncio.sleep(0.005)
    await tokens.aclose()
