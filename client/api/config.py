"""The one configuration of ``brigade serve``; the CLI builds it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0 exposes the API: set an API key)
    port: int = 8000  # TCP port; 0 picks a free one (the ready line says which)
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    served_model_name: str | None = None  # the model id clients use; default: the model's DHT name
    max_active: int = 32  # requests generating at once (each holds cache on every peer of its route)
    max_queued: int = 256  # requests waiting for a turn; more get 503
    queue_timeout_s: float = 60.0  # longest wait for a turn before 503
    request_timeout_s: float = 600.0  # longest generation, from its first step to its last token
    max_n: int = 16  # most choices per request
    max_prompts: int = 64  # most prompts in one /v1/completions request
    max_body_bytes: int = 4 * 1024 * 1024  # request bodies above this get 413
    default_completion_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    graceful_shutdown_s: float = 5.0  # on SIGTERM, how long open streams may finish before they are cut
