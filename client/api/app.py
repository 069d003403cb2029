"""The HTTP face of the service: OpenAI's routes, server-sent events, API keys, the chat page.

Every request is admitted (bounded line, bounded wait) before its response starts, so "busy"
is a real 503 and not an error hidden in a stream. A client that goes away is noticed at once
(its connection's disconnect event, not the next write) and its generation is cancelled, which
closes its sessions on the peers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brigade.client.api.admission import Lease
from brigade.client.api.errors import ApiError, install_error_handlers
from brigade.client.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from brigade.client.api.service import ApiService, Delta, Job

logger = logging.getLogger(__name__)

T = TypeVar("T")


def create_app(service: ApiService) -> FastAPI:
    # No /docs: FastAPI's interactive docs load their scripts from a CDN.
    app = FastAPI(title="brigade", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=service.config.api_key, max_body_bytes=service.config.max_body_bytes)
    page = _ChatPage()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page.html(), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        admission = service.admission
        return {"status": "ok", "model": service.model_id, "active": admission.active, "queued": admission.queued}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id)
        return _model_card(service)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(service, body, lambda: service.completion_job(body), request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(service, body, lambda: service.chat_job(body), request, chat=True)

    return app


def _model_card(service: ApiService) -> dict[str, Any]:
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "brigade",
            "max_model_len": service.context_length}


async def _respond(service: ApiService, body: SamplingFields, build_job: Callable[[], Job], request: Request,
                   chat: bool) -> Response:
    """Admits the request, then builds its job: a busy server refuses before it spends a thread
    tokenizing the prompt (or rendering the chat), which a flood of large prompts would make it pay."""
    lease = await service.admission.admit()
    handed_over = False
    try:
        job = await asyncio.to_thread(build_job)  # tokenizing may take a while: off the loop
        reply = _Reply(service.model_id, chat, job.n * len(job.prompts))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            response = EventStream(reply.sse(service.run(job), job, include_usage), lease)
            handed_over = True  # from here the stream releases the lease, however it ends
            return response
        result = await _unless_disconnected(reply.collect(service.run(job), job), request.receive)
        return JSONResponse(result) if result is not None else Response(status_code=499)
    finally:
        if not handed_over:
            lease.release()


class _Reply:
    """OpenAI's response and chunk objects for one request."""

    def __init__(self, model_id: str, chat: bool, choices: int):
        self.chat = chat
        self.choices = choices
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.model_id = model_id
        self.object = "chat.completion" if chat else "text_completion"
        self._began = time.monotonic()

    def log_done(self, job: Job, how: str) -> None:
        usage = job.usage()
        logger.info("%s %s: %d prompt + %d completion tokens in %.2f s (%s)", self.id, how, usage["prompt_tokens"],
                    usage["completion_tokens"], time.monotonic() - self._began,
                    ",".join(sorted(set(job.finish_reasons.values()))) or "unfinished")

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": choices}

    async def collect(self, deltas: AsyncIterator[Delta], job: Job) -> dict[str, Any]:
        texts = [""] * self.choices
        async for delta in deltas:
            texts[delta.index] += delta.text
        choices = []
        for index, text in enumerate(texts):
            reason = job.finish_reasons.get(index, "length")
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": reason})
        self.log_done(job, "answered")
        return {**self._envelope(self.object, choices), "usage": job.usage()}

    def _chunk(self, index: int, text: str | None, finish: str | None, usage: bool, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunk = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            chunk = self._envelope("text_completion", [choice])
        if usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last, when usage is asked for
        return _sse(chunk)

    async def sse(self, deltas: AsyncIterator[Delta], job: Job, include_usage: bool) -> AsyncIterator[str]:
        """The chunks of a streamed answer, then ``[DONE]``; an error becomes an error event, as vLLM sends it."""
        try:
            if self.chat:  # OpenAI first says who speaks, with empty content
                for index in range(self.choices):
                    yield self._chunk(index, None, None, include_usage, role=True)
            async for delta in deltas:
                yield self._chunk(delta.index, delta.text, delta.finish_reason, include_usage)
            if include_usage:
                yield _sse({**self._envelope(f"{self.object}.chunk" if self.chat else self.object, []),
                            "usage": job.usage()})
            self.log_done(job, "streamed")
        except ApiError as error:
            logger.info("%s failed: %s", self.id, error.message)
            yield _sse(error.body())
        except Exception as error:  # headers are sent: the error can only travel as an event
            logger.exception("a streamed generation failed")
            yield _sse(ApiError(500, f"internal error: {type(error).__name__}", type_="server_error").body())
        yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(work: Awaitable[T], receive: Receive) -> T | None:
    """``work``'s result, or None (with ``work`` cancelled) when the client goes away first."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, watch):
            task.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)
    if job.cancelled():
        return None
    return job.result()


class EventStream(Response):
    """A ``text/event-stream`` response that stops its events the moment the client disconnects.

    Starlette's StreamingResponse would notice only at its next write (or not at all on some
    ASGI versions); this one waits for the disconnect event beside the writes. The request's lease
    is released however the response ends, even when it never starts.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], lease: Lease):
        # Not Response.__init__: that would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await _unless_disconnected(self._write(send), receive)
        finally:
            try:
                await self.events.aclose()  # closes the generation, and with it the sessions on the peers
            finally:
                self.lease.release()

    async def _write(self, send: Send) -> None:
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between two writes
            return


class Guard:
    """ASGI middleware: API key on /v1/*, and a cap on request bodies, before any route sees them."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1"):
            refusal = self._check_key(headers.get("authorization"))
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            error = ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, self._capped(receive), send)

    def _check_key(self, authorization: str | None) -> ApiError | None:
        if not authorization:
            return ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                            code="invalid_api_key")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def _capped(self, receive: Receive) -> Callable[[], Awaitable[Message]]:
        """Bodies sent without a length (chunked) are counted as they arrive."""
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # FastAPI passes HTTPException through body parsing
                    raise HTTPException(413, f"the request body is larger than {self.max_body_bytes} bytes")
            return message

        return capped_receive


class _ChatPage:
    """The chat page, read from the package on first use (constructors do no I/O)."""

    def __init__(self) -> None:
        self._html: str | None = None

    def html(self) -> str:
        if self._html is None:
            self._html = (resources.files("brigade.client.api") / "static" / "chat.html").read_text("utf-8")
        return self._html
