"""The client's one async core: a causal LM whose decoder layers run on the swarm, on the caller's loop.

``AsyncDistributedModelForCausalLM`` lives on the event loop that created it (its DHT node, gRPC
channels and sessions do too) and holds the one generation loop, ``stream``: a decoder (plain or
speculative, ``client/decoding.py``) carries tensors to and from an ``InferenceSession``, the head's
compute (embeddings, LM head, sampling, drafting) runs on one worker thread so the loop stays free
for other sessions and result checks. Everything else is a facade over this: the synchronous
``DistributedModelForCausalLM`` (``client/model.py``) runs it on a private loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutput

from brigade.client.bans import PeerBans
from brigade.client.config import ClientConfig
from brigade.client.decoding import Decoder, GenerationOptions, StepDecoder, StepInput, StepReport
from brigade.client.recovery import FailoverEvent
from brigade.client.remote import RemoteSwarm
from brigade.client.sampling import TokenChooser
from brigade.client.session import InferenceSession
from brigade.client.speculative import DraftCache, SpeculationStats, speculative_decoder
from brigade.client.standing import PeerStanding
from brigade.client.stateless import forward_through
from brigade.client.verify.verifier import ResultVerifier
from brigade.kernels.checkpoint import resolve_config_folder
from brigade.kernels.loading import load_config, load_head
from brigade.protocol.records import model_name_for

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class GenerationReport:
    """What one generation (or forward) did: its route, recoveries, speculation and result checks."""

    route: list[str] = field(default_factory=list)  # "peer_id[start:end]" per hop, as it is now
    forwarding: list[bool] = field(default_factory=list)  # per hop: it sends its output straight on
    events: list[FailoverEvent] = field(default_factory=list)  # recoveries, in order
    speculation: SpeculationStats | None = None  # rounds, with a draft_model
    verifier: ResultVerifier | None = None  # the result checks of its session

    def observe(self, session: InferenceSession) -> None:
        self.route = [f"{hop.peer.peer_id}[{hop.start}:{hop.end}]" for hop in session.route]
        self.forwarding = [stream.forwards for stream in session.hops]


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


class AsyncDistributedModelForCausalLM:
    """``await AsyncDistributedModelForCausalLM.from_pretrained(...)`` on your loop; ``await close()`` when done."""

    def __init__(self, model: str, config: Any, head: Any, client_config: ClientConfig, model_name: str,
                 generation_config: GenerationConfig | None = None):
        self.model_path = model
        self.config = config
        self.head = head
        self.client_config = client_config
        self.model_name = model_name
        self.generation_config = generation_config or GenerationConfig()
        # One owner of what this client knows about peers: every session, check and pass of the model uses it.
        self.standing = PeerStanding(PeerBans(client_config.ban_base_s, client_config.ban_max_s))
        self.swarm = RemoteSwarm(client_config, model_name, config.num_hidden_layers,
                                 hidden_size=head.args.hidden_size, rope_by_length=head.args.rope_by_length)
        self.last = GenerationReport()  # of the generation (or forward) started last
        self._drafts = DraftCache()
        self._head = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brigade-head")  # started lazily

    @classmethod
    async def from_pretrained(cls, model: str, initial_peers: list[str] | tuple[str, ...] = (), *,
                              dtype: torch.dtype = torch.float32, revision: str | None = None,
                              **client_options: Any) -> AsyncDistributedModelForCausalLM:
        """Loads only the embeddings, final norm and LM head of ``model``, and joins the swarm."""
        config = await asyncio.to_thread(load_config, model, revision)
        head = await asyncio.to_thread(load_head, model, dtype=dtype, revision=revision, config=config)
        client_config = replace(ClientConfig(), initial_peers=tuple(initial_peers), **client_options)
        generation_config = await asyncio.to_thread(_generation_config, model)
        instance = cls(model, config, head, client_config, client_config.model_name or model_name_for(model),
                       generation_config)
        async with asyncio.timeout(client_config.dht_startup_timeout_s + 10):
            await instance.swarm.start()
        return instance

    async def _on_head(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._head, work, *args)

    def _check_length(self, positions: int) -> None:
        """This client's own check of a request's length: past the model's positions every peer would refuse
        it, so it is the caller's error here (a peer's refusal alone never is)."""
        limit = self.head.args.max_position_embeddings
        if positions > limit:
            raise ValueError(f"{positions} positions (prompt plus new tokens) is more than the model's {limit}")

    # -- plain forward ----------------------------------------------------------------------------
    async def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """Full-sequence logits [B, T, V], like a transformers model's forward."""
        pads = check_prompt(input_ids, attention_mask)
        self._check_length(input_ids.shape[1])
        hidden = await self._on_head(self.head.embed, input_ids)
        hidden, route = await forward_through(self.swarm, self.standing, hidden, pads)
        self.last = GenerationReport(route=route)
        return CausalLMOutput(logits=await self._on_head(self.head.logits, hidden))

    __call__ = forward

    # -- generation: the one loop -------------------------------------------------------------------
    async def stream(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 20,
        do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
        top_p: float | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
        generator: torch.Generator | None = None, draft_model: Any | None = None, draft_tokens: int | None = None,
    ) -> AsyncIterator[torch.Tensor]:
        """Yields each new token [B] as soon as it is settled.

        ``draft_model`` (a small transformers causal LM with this model's vocabulary, or a path to
        one) turns on speculative decoding: the draft proposes tokens that the swarm checks several
        at a time; ``draft_tokens`` fixes how many per step. ``generator`` gives this call its own
        sampling random stream. A consumer that stops early (``break``, ``aclose``) or is cancelled
        closes the session on every hop before the generator finishes, so peers free its cache.
        """
        if max_new_tokens < 1:
            return
        pads = check_prompt(input_ids, attention_mask)
        self._check_length(input_ids.shape[1] + max_new_tokens)
        options = GenerationOptions.resolve(
            self.generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        report = self.last = GenerationReport()
        decoder, report.speculation = await self._on_head(self._decoder, input_ids, options, pads, draft_model,
                                                          draft_tokens, generator)
        session = InferenceSession(self.swarm, self.standing, input_ids.shape[0], input_ids.shape[1] + max_new_tokens,
                                   pads)
        report.events = session.events
        report.verifier = ResultVerifier.attach(session)
        try:
            await session.open()
            report.observe(session)
            step = await self._on_head(decoder.first)
            while step is not None:
                out, step_report = await _timed_step(session, step)
                report.observe(session)
                tokens = await self._on_head(decoder.accept, out, step_report)
                following = asyncio.ensure_future(self._on_head(decoder.next))  # drafts while tokens go out
                try:
                    for token in tokens:
                        yield token
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

    async def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int = 20, **options: Any) -> torch.Tensor:
        """Prompt plus new tokens [B, T + n], as transformers' generate returns them."""
        columns = [tokens[:, None] async for tokens in self.stream(input_ids, attention_mask,
                                                                    max_new_tokens=max_new_tokens, **options)]
        return torch.cat([input_ids, *columns], dim=1)

    def _decoder(self, input_ids: torch.Tensor, options: GenerationOptions, pads: list[int], draft_model: Any | None,
                 draft_tokens: int | None, generator: torch.Generator | None,
                 ) -> tuple[Decoder, SpeculationStats | None]:
        """The per-step logic of one generation: plain, or speculative with ``draft_model`` (loads it here, off
        the loop, when given by path)."""
        choose = TokenChooser(options.params, generator)
        if draft_model is None:
            if draft_tokens is not None:
                raise ValueError("draft_tokens needs a draft_model")
            return StepDecoder(self.head, choose, input_ids, options), None
        draft = self._drafts.get(draft_model, self.head.args.vocab_size, _local_folder(self.model_path))
        return speculative_decoder(self.head, choose, input_ids, options, pads, draft, draft_tokens)

    async def close(self) -> None:
        try:
            await self.swarm.close()
        finally:
            self._head.shutdown(wait=False)

    async def __aenter__(self) -> AsyncDistributedModelForCausalLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
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


def _generation_config(model: str) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(resolve_config_folder(model))
    except OSError:
        return GenerationConfig()
