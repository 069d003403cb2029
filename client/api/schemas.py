"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions``, as OpenAI defines them.

Types are strict (``"5"`` is not a number, ``true`` is not an integer), as OpenAI's API answers
them; unknown fields are ignored, as OpenAI's servers do, so clients written for newer API
versions still work. Known fields we cannot honour are refused only when set to something other
than their no-op default (``presence_penalty: 0`` is fine, ``0.5`` is a 400), because silently
ignoring them would give answers the client did not ask for. ``top_k`` and ``ignore_eos`` are
vLLM's extensions, kept because benchmarks and tools written for vLLM send them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # one last chunk with the usage and no choices


class SamplingFields(_Body):
    """What both endpoints share: the model, sampling, stopping and streaming."""

    model: str | None = None  # None: the one served model (OpenAI requires it; vLLM and llama.cpp do not)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # 0: greedy
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM: -1 or 0 means no cut
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM: keep generating past the end-of-sequence token
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)  # unsupported unless 0
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)  # unsupported unless 0
    logit_bias: dict[str, float] | None = None  # unsupported unless empty

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]

    def unsupported(self) -> list[str]:
        """Names of fields set to something this server cannot do."""
        names = []
        if self.presence_penalty:
            names.append("presence_penalty")
        if self.frequency_penalty:
            names.append("frequency_penalty")
        if self.logit_bias:
            names.append("logit_bias")
        return names


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False  # the prompt's text before the completion's
    suffix: str | None = None  # unsupported
    logprobs: int | None = None  # unsupported unless null
    best_of: int | None = Field(default=None, ge=1)  # unsupported unless equal to n

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.suffix:
            names.append("suffix")
        if self.logprobs is not None:
            names.append("logprobs")
        if self.best_of is not None and self.best_of != self.n:
            names.append("best_of")
        return names


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message as one string; only text parts exist for a text model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported: this model reads text only")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None  # unsupported unless false
    top_logprobs: int | None = None  # unsupported unless null
    response_format: dict[str, Any] | None = None  # only {"type": "text"}

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.logprobs:
            names.append("logprobs")
        if self.top_logprobs is not None:
            names.append("top_logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            names.append("response_format")
        return names

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them; "developer" is OpenAI's newer name for "system"."""
        rendered = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            item = {"role": role, "content": message.text()}
            if message.name:
                item["name"] = message.name
            rendered.append(item)
        return rendered
