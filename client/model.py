"""``DistributedModelForCausalLM``: a causal LM whose decoder layers run on the swarm.

The client holds the embeddings, final norm and LM head; everything between goes through a
route of peers. ``generate`` mirrors transformers' (greedy and sampling, batches with left
padding, EOS handling) so the same call gives the same tokens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutput

from brigade.client.bans import PeerBans
from brigade.client.config import ClientConfig
from brigade.client.decoding import Decoder, GenerationOptions, StepDecoder, StepInput, StepReport
from brigade.client.loop import LoopThread
from brigade.client.remote import RemoteSwarm
from brigade.client.sampling import TokenChooser
from brigade.client.session import FailoverEvent, InferenceSession
from brigade.client.speculative import DraftCache, SpeculationStats, speculative_decoder
from brigade.client.stateless import forward_through
from brigade.client.verification import ResultVerifier
from brigade.kernels.checkpoint import resolve_config_folder
from brigade.kernels.loading import load_config, load_head
from brigade.protocol.records import model_name_for

logger = logging.getLogger(__name__)

# How long ``astream``'s session waits for its consumer to take the next token before giving up
# (a consumer that vanished without closing): the peers' idle-session expiry is of the same order.
HANDOFF_TIMEOUT_S = 300.0
# Bound on waiting for an abandoned ``astream`` session to close on every hop.
CLOSE_TIMEOUT_S = 15.0


def left_pad_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Left padding per row; refuses masks with holes or right padding, which would change results."""
    mask = attention_mask.to(torch.long)
    pads = (mask.cumsum(dim=1) == 0).sum(dim=1)
    valid = torch.arange(mask.shape[1])[None, :] >= pads[:, None]
    if not torch.equal(mask.bool(), valid):
        raise ValueError(
            "attention_mask must be left-padded (zeros first, then ones); set tokenizer.padding_side='left'"
        )
    if bool((pads >= mask.shape[1]).any()):
        raise ValueError("every sequence needs at least one token")
    return pads.tolist()


class DistributedModelForCausalLM:
    """Use like a transformers causal LM; call ``close()`` (or use ``with``) when done."""

    def __init__(self, model: str, config: Any, head: Any, client_config: ClientConfig, model_name: str):
        self.model_path = model
        self.config = config
        self.head = head
        self.client_config = client_config
        self.model_name = model_name
        self.generation_config = _generation_config(model)
        self.last_route: list[str] = []
        self.last_events: list[FailoverEvent] = []  # recoveries during the last generate / stream
        self.last_forwarding: list[bool] = []  # per hop of the last route: it sent its output straight on
        self.last_speculation: SpeculationStats | None = None  # rounds of the last stream with a draft_model
        self._drafts = DraftCache()
        self.bans = PeerBans(client_config.ban_base_s, client_config.ban_max_s)
        self.distrusted: set[str] = set()  # peers a result check caught cheating: no session of this model uses them
        self.last_verifier: ResultVerifier | None = None  # result checks of the last generate / stream
        self._loop = LoopThread()
        self.swarm = RemoteSwarm(client_config, model_name, config.num_hidden_layers,
                                 hidden_size=head.args.hidden_size, rope_by_length=head.args.rope_by_length)
        # astream's embeddings, LM head and sampling: off every event loop, one thread (threads start lazily).
        self._head_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brigade-head")

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        **client_options: Any,
    ) -> DistributedModelForCausalLM:
        """Loads only the embeddings, final norm and LM head of ``model``, and joins the swarm."""
        config = load_config(model, revision)
        head = load_head(model, dtype=dtype, revision=revision, config=config)
        client_config = replace(ClientConfig(), initial_peers=tuple(initial_peers), **client_options)
        name = client_config.model_name or model_name_for(model)
        instance = cls(model, config, head, client_config, name)
        try:
            instance._loop.run(instance.swarm.start(), client_config.dht_startup_timeout_s + 10)
        except BaseException:
            instance._loop.close()
            raise
        return instance

    # -- plain forward -------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """Full-sequence logits [B, T, V], like a transformers model's forward."""
        pads = _check_prompt(input_ids, attention_mask)
        self._check_length(input_ids.shape[1])
        hidden = self.head.embed(input_ids)
        hidden, self.last_route = self._loop.run(forward_through(self.swarm, self.bans, hidden, pads,
                                                                 self.distrusted))
        return CausalLMOutput(logits=self.head.logits(hidden))

    def _check_length(self, positions: int) -> None:
        """This client's own check of a request's length: past the model's positions every peer would refuse
        it, so it is the caller's error here (a peer's refusal alone never is)."""
        limit = self.head.args.max_position_embeddings
        if positions > limit:
            raise ValueError(f"{positions} positions (prompt plus new tokens) is more than the model's {limit}")

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        streamer: Any | None = None,
        **options: Any,
    ) -> torch.Tensor:
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

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        draft_model: Any | None = None,
        draft_tokens: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields each new token [B] as soon as it is settled.

        ``draft_model`` (a small transformers causal LM with this model's vocabulary, or a path to
        one) turns on speculative decoding: the draft proposes tokens that the swarm checks several
        at a time; ``draft_tokens`` fixes how many per step (default: adapted to the measured
        acceptance and step time). ``last_speculation`` then says what it did.
        """
        options = GenerationOptions.resolve(
            self.generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if max_new_tokens < 1:
            return
        pads = _check_prompt(input_ids, attention_mask)
        self._check_length(input_ids.shape[1] + max_new_tokens)
        decoder, self.last_speculation = self._decoder(input_ids, options, pads, draft_model, draft_tokens, None)
        session, self.last_verifier = self._new_session(input_ids.shape[0], input_ids.shape[1] + max_new_tokens,
                                                        pads)
        self.last_events = session.events
        run = self._loop.run
        run(session.open())
        try:
            self.last_route = _describe(session.route)
            self.last_forwarding = [stream.forwards for stream in session.hops]
            recoveries_seen = len(session.events)
            step = decoder.first()
            while step is not None:
                out, report = run(_timed_step(session, step))
                if len(session.events) != recoveries_seen:  # the route only changes on a recovery
                    recoveries_seen = len(session.events)
                    self.last_route = _describe(session.route)
                    self.last_forwarding = [stream.forwards for stream in session.hops]
                yield from decoder.accept(out, report)
                step = decoder.next()
        finally:
            run(session.close(), 10.0)

    async def astream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        prefetch: int = 2,
        draft_model: Any | None = None,
        draft_tokens: int | None = None,
    ) -> AsyncIterator[torch.Tensor]:
        """``stream`` for async code, from any event loop: yields each new token [B].

        The session runs on the model's own loop (where its gRPC channels live) and hands tokens
        over a queue of ``prefetch`` steps, so decoding runs a little ahead of a slow consumer but
        never far. When the consumer stops early (``break``, ``aclose``) or is cancelled, the
        session is closed on every hop before this generator finishes, so peers free its cache at
        once. Many ``astream`` calls may run at the same time, each with its own session;
        ``generator`` gives a call its own sampling random stream. ``last_route``, ``last_events``
        and ``last_speculation`` are not updated: they mean nothing with concurrent calls.
        """
        if max_new_tokens < 1:
            return
        pads = _check_prompt(input_ids, attention_mask)
        self._check_length(input_ids.shape[1] + max_new_tokens)
        options = GenerationOptions.resolve(
            self.generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

        consumer_loop = asyncio.get_running_loop()
        handoff: asyncio.Queue[torch.Tensor | _Finished] = asyncio.Queue(maxsize=max(1, prefetch))
        closed: asyncio.Future[None] = consumer_loop.create_future()
        gone = threading.Event()  # the consumer stopped: a second way to stop the producer, should a cancel be lost

        async def deliver(item: torch.Tensor | _Finished) -> None:  # on the model's loop
            if gone.is_set():
                raise _ConsumerGone
            put = asyncio.run_coroutine_threadsafe(handoff.put(item), consumer_loop)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(HANDOFF_TIMEOUT_S):
                await asyncio.wrap_future(put)

        def mark_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        def make_decoder() -> Decoder:  # on the head thread: a draft given by path loads here, off every loop
            return self._decoder(input_ids, options, pads, draft_model, draft_tokens, generator)[0]

        async def produce() -> None:  # on the model's loop
            try:
                decoder = await asyncio.get_running_loop().run_in_executor(self._head_executor, make_decoder)
                session, _ = self._new_session(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, pads)
                await self._run_session(session, decoder, deliver)
                await deliver(_Finished(None))
            except _ConsumerGone:
                pass
            except Exception as error:
                try:
                    await deliver(_Finished(error))
                except Exception:
                    logger.warning("astream consumer went away before its error could be handed over: %s", error)
            finally:
                try:
                    consumer_loop.call_soon_threadsafe(mark_closed)
                except RuntimeError:  # the consumer's loop is gone: nobody waits for this
                    pass

        producer = asyncio.run_coroutine_threadsafe(produce(), self._loop.loop)
        try:
            while True:
                item = await handoff.get()
                if isinstance(item, _Finished):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            gone.set()
            producer.cancel()  # no-op when it already finished
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(closed)
            except TimeoutError:
                logger.warning("an astream session did not close within %.0f s", CLOSE_TIMEOUT_S)

    def _new_session(self, batch_size: int, max_length: int,
                     pads: list[int]) -> tuple[InferenceSession, ResultVerifier | None]:
        """A session that shares this model's bans and distrust, with its result checks attached."""
        session = InferenceSession(self.swarm, self.bans, batch_size, max_length, pads)
        session.distrusted = self.distrusted
        return session, ResultVerifier.attach(session)

    async def _run_session(
        self, session: InferenceSession, decoder: Decoder, deliver: Callable[[torch.Tensor], Awaitable[None]],
    ) -> None:
        """astream's step loop on the model's loop: ``stream``'s, with the head's compute on its own thread."""
        loop = asyncio.get_running_loop()
        await session.open()
        try:
            step = await loop.run_in_executor(self._head_executor, decoder.first)
            while step is not None:
                out, report = await _timed_step(session, step)
                tokens = await loop.run_in_executor(self._head_executor, decoder.accept, out, report)
                following = loop.run_in_executor(self._head_executor, decoder.next)  # drafts while tokens go out
                try:
                    for token in tokens:
                        await deliver(token)
                except BaseException:
                    following.cancel()  # its thread finishes the draft; nobody reads it
                    raise
                step = await following
        finally:
            # A cancel arriving mid-close must not leave some hops open (each holds cache on its peer).
            closing = asyncio.ensure_future(session.close())
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise

    def _decoder(self, input_ids: torch.Tensor, options: GenerationOptions, pads: list[int], draft_model: Any | None,
                 draft_tokens: int | None, generator: torch.Generator | None,
                 ) -> tuple[Decoder, SpeculationStats | None]:
        """The per-step logic of one generation: plain, or speculative with ``draft_model``."""
        choose = TokenChooser(options.params, generator)
        if draft_model is None:
            if draft_tokens is not None:
                raise ValueError("draft_tokens needs a draft_model")
            return StepDecoder(self.head, choose, input_ids, options), None
        draft = self._drafts.get(draft_model, self.head.args.vocab_size, _local_folder(self.model_path))
        return speculative_decoder(self.head, choose, input_ids, options, pads, draft, draft_tokens)

    def close(self) -> None:
        try:
            self._loop.run(self.swarm.close(), 30.0)
        finally:
            self._loop.close()
            self._head_executor.shutdown(wait=False)

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ConsumerGone(Exception):
    """The astream consumer stopped; its producer ends (closing its session) instead of delivering."""


class _Finished:
    """The end of an astream hand-off: normal (``error`` None) or with the error to raise."""

    def __init__(self, error: Exception | None):
        self.error = error


def _check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Each row's left padding, after checking the prompt's shape."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length>0], got {list(input_ids.shape)}")
    return left_pad_lengths(attention_mask if attention_mask is not None else torch.ones_like(input_ids))


async def _timed_step(session: InferenceSession, step: StepInput) -> tuple[torch.Tensor, StepReport]:
    """One session step and what speculation measures of it (its time, the lengths the peers report)."""
    began = time.perf_counter()
    out = await session.step(step.hidden, step.start, step.rope_lengths)
    report = StepReport(time.perf_counter() - began, session.position,
                        tuple(stream.reported_length for stream in session.hops))
    return out, report


def _local_folder(model: str) -> str | None:
    """The model's local folder (where its tokenizer would be), without reaching for the Hub."""
    try:
        return str(resolve_config_folder(model))
    except OSError:
        return None


def _describe(route: list[Any]) -> list[str]:
    return [f"{hop.peer.peer_id}[{hop.start}:{hop.end}]" for hop in route]


def _generation_config(model: str) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(resolve_config_folder(model))
    except OSError:
        return GenerationConfig()

