"""The API admits a request before it tokenizes it: a full server answers 503 without spending a
worker thread on the prompt (tokenizing megabytes of text is the cost a flood would make it pay).

In process: the ASGI app over a fake model and a tokenizer that counts its calls, driven with raw
ASGI messages (no HTTP client needed).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from brigade.client.api.app import create_app
from brigade.client.api.config import ServeConfig
from brigade.client.api.service import ApiService


class CountingTokenizer:
    eos_token_id = 0
    pad_token_id = 0
    chat_template = None

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, **_: Any) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(input_ids=[1] * min(len(text), 8))

    def decode(self, ids: list[int]) -> str:
        return "x" * len(ids)


def _fake_model() -> SimpleNamespace:
    generation = SimpleNamespace(eos_token_id=0, to_diff_dict=lambda: {})
    return SimpleNamespace(model_name="fake", config=SimpleNamespace(max_position_embeddings=512, vocab_size=32),
                           generation_config=generation)


async def _post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": payload, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    return status, b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")


def test_a_busy_server_refuses_before_tokenizing() -> None:
    async def scenario() -> None:
        tokenizer = CountingTokenizer()
        service = ApiService(_fake_model(), tokenizer, ServeConfig(max_active=1, max_queued=0, queue_timeout_s=1))
        app = create_app(service)
        held = await service.admission.admit()  # the one turn is taken
        try:
            status, body = await _post(app, "/v1/completions", {"model": "fake", "prompt": "hello " * 1000})
            assert status == 503, body
            assert tokenizer.calls == 0, "the prompt was tokenized before the request was admitted"
            chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
            status, body = await _post(app, "/v1/chat/completions", chat)
            assert status == 503, body
            assert tokenizer.calls == 0
        finally:
            held.release()
        assert (service.admission.active, service.admission.queued) == (0, 0)

    asyncio.run(scenario())
