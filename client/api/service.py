"""From a validated request to token ids, and from the swarm's tokens to text deltas per choice.

A request becomes one ``astream`` session whose batch holds every choice: each prompt repeated
``n`` times, left-padded to one length. Choice ``i * n + j`` is prompt ``i``'s ``j``-th answer,
as OpenAI numbers them. A choice ends at an end-of-sequence token, at a stop string, or at
``max_tokens``; the session ends as soon as every choice has, which closes it on the peers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from brigade.client.api.admission import Admission
from brigade.client.api.config import ServeConfig
from brigade.client.api.errors import ApiError, bad_request
from brigade.client.api.schemas import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from brigade.client.api.text import TextStream
from brigade.protocol.errors import BrigadeError

logger = logging.getLogger(__name__)


class Delta(NamedTuple):
    """New text of one choice; ``finish_reason`` is set on the choice's last delta."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class Job:
    """One request, ready for the swarm."""

    prompts: list[list[int]]  # token ids of each prompt
    n: int  # choices per prompt
    max_tokens: int  # new tokens per choice at most
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int  # 0: no cut
    seed: int | None
    stop: list[str]
    eos: list[int]  # empty with ignore_eos
    echo: list[str] | None = None  # text put before each prompt's choices (completions' echo)
    completion_tokens: int = 0  # filled in while running
    finish_reasons: dict[int, str] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)  # once per prompt, whatever n is, as OpenAI counts

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ApiService:
    """What the HTTP layer calls: checks requests, builds jobs, runs them on the distributed model."""

    def __init__(self, model: Any, tokenizer: Any, config: ServeConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_id = config.served_model_name or model.model_name
        self.context_length = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.admission = Admission(config.max_active, config.max_queued, config.queue_timeout_s)
        self.created = int(time.time())
        eos = set(_as_list(model.generation_config.eos_token_id))
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos = sorted(eos)
        self.pad_id = next((i for i in (tokenizer.pad_token_id, *self.eos) if i is not None), 0)
        # Sampling defaults the checkpoint's generation_config.json sets explicitly (as vLLM does); OpenAI's otherwise.
        explicit = model.generation_config.to_diff_dict()
        self.default_temperature = float(explicit.get("temperature") or 1.0)
        self.default_top_p = float(explicit.get("top_p") or 1.0)
        self.default_top_k = int(explicit.get("top_k") or 0)

    # -- checking requests ---------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_id:
            raise ApiError(404, f"The model '{requested}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    def completion_job(self, request: CompletionRequest) -> Job:
        self._check_common(request)
        prompt = request.prompt
        if isinstance(prompt, str):
            texts: list[str] | None = [prompt]
        elif prompt and all(isinstance(item, str) for item in prompt):
            texts = list(prompt)  # type: ignore[arg-type]
        else:
            texts = None
        if texts is not None:
            prompts = [self.tokenizer(text).input_ids for text in texts]
        elif prompt and all(isinstance(item, int) for item in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = [list(item) for item in prompt]  # type: ignore[union-attr]
        if not prompts:
            raise bad_request("prompt must not be an empty list", param="prompt")
        if len(prompts) > self.config.max_prompts:
            raise bad_request(f"at most {self.config.max_prompts} prompts per request, got {len(prompts)}",
                              param="prompt")
        for ids in prompts:
            if any(not 0 <= token < self.vocab_size for token in ids):
                raise bad_request(f"token ids must be in [0, {self.vocab_size})", param="prompt")
        job = self._job(request, prompts, request.max_tokens, self.config.default_completion_tokens, "prompt")
        if request.echo:
            job.echo = texts if texts is not None else [self.tokenizer.decode(ids) for ids in prompts]
        return job

    def chat_job(self, request: ChatCompletionRequest) -> Job:
        self._check_common(request)
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(f"the model '{self.model_id}' has no chat template; use /v1/completions",
                              param="messages", code="no_chat_template")
        try:
            messages = request.template_messages()
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template's own raise_exception, or a content part we cannot read
            raise bad_request(f"could not apply the chat template: {error}", param="messages") from error
        # The template wrote the special tokens it wants (BOS included): add none, as vLLM does.
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        max_tokens = request.max_completion_tokens or request.max_tokens
        return self._job(request, [ids], max_tokens, None, "messages")

    def _check_common(self, request: SamplingFields) -> None:
        self.check_model(request.model)
        unsupported = request.unsupported()
        if unsupported:
            raise bad_request(f"'{unsupported[0]}' is not supported by this server", param=unsupported[0],
                              code="unsupported_parameter")
        if request.n > self.config.max_n:
            raise bad_request(f"n must be at most {self.config.max_n}, got {request.n}", param="n")
        stops = request.stop_strings()
        if len(stops) > MAX_STOP_STRINGS or any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters",
                              param="stop")

    def _job(self, request: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
             default_tokens: int | None, prompt_param: str) -> Job:
        longest = max(len(ids) for ids in prompts)
        if min(len(ids) for ids in prompts) == 0:
            raise bad_request("the prompt has no tokens", param=prompt_param)
        room = self.context_length - longest
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {self.context_length} tokens, but the prompt has {longest} "
                "tokens. Please shorten the prompt.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_tokens is None else min(default_tokens, room)
        elif longest + max_tokens > self.context_length:
            raise bad_request(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
        temperature = self.default_temperature if request.temperature is None else request.temperature
        top_k = self.default_top_k if request.top_k is None else request.top_k
        return Job(
            prompts=prompts, n=request.n, max_tokens=max_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=self.default_top_p if request.top_p is None else request.top_p,
            top_k=max(0, top_k), seed=request.seed, stop=request.stop_strings(),
            eos=[] if request.ignore_eos else list(self.eos),
        )

    # -- running -------------------------------------------------------------------------------
    async def run(self, job: Job) -> AsyncIterator[Delta]:
        """Deltas of every choice as the swarm produces them; each choice's last one has its finish reason."""
        rows = [prompt for prompt in job.prompts for _ in range(job.n)]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None and job.do_sample else None
        texts = [TextStream(self.tokenizer, job.stop) for _ in rows]
        counts = [0] * len(rows)
        eos = set(job.eos)
        if job.echo is not None:
            for index in range(len(rows)):
                yield Delta(index, job.echo[index // job.n])
        tokens_stream = self.model.astream(
            input_ids, mask, max_new_tokens=job.max_tokens, do_sample=job.do_sample, temperature=job.temperature,
            top_p=job.top_p, top_k=job.top_k, eos_token_id=job.eos, pad_token_id=self.pad_id, generator=generator,
        )
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        try:
            while len(job.finish_reasons) < len(rows):
                try:
                    async with asyncio.timeout_at(deadline):
                        tokens = await anext(tokens_stream)
                except StopAsyncIteration:
                    break
                for index, token in enumerate(tokens.tolist()):
                    if index in job.finish_reasons:
                        continue
                    counts[index] += 1
                    if token in eos:
                        delta, finish = texts[index].finish(), "stop"
                    else:
                        delta = texts[index].push(token)
                        finish = "stop" if texts[index].stopped else None
                        if finish is None and counts[index] >= job.max_tokens:
                            delta, finish = delta + texts[index].finish(), "length"
                    if finish is not None:
                        job.finish_reasons[index] = finish
                    job.completion_tokens = sum(counts)
                    if delta or finish:
                        yield Delta(index, delta, finish)
        except TimeoutError:
            raise ApiError(504, f"the generation took longer than {self.config.request_timeout_s:.0f} s",
                           type_="server_error", code="timeout") from None
        except ValueError as error:  # the client's own check of this request: no peer's word
            raise bad_request(str(error)) from error
        except BrigadeError as error:  # peers failed or refused, whatever they said: never the request's fault
            raise ApiError(503, f"the swarm could not serve the request: {error}", type_="server_error",
                           code="swarm_unavailable") from error
        finally:
            await tokens_stream.aclose()
        for index in range(len(rows)):  # the session ended early (every row hit EOS as padding caught up)
            if index not in job.finish_reasons:
                job.finish_reasons[index] = "length"
                rest = texts[index].finish()
                yield Delta(index, rest, "length")


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
