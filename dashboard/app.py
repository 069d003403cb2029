"""The dashboard's web service: read-only routes over what the crawler last published.

FastAPI (the project's web framework) for the routes, the lifespan that owns the crawl task, and
the OpenAPI document of the JSON schema at ``/openapi.json``. Its interactive docs are off: they
load scripts from a CDN, and the page must work without internet.

Peer records are written by anyone, so the page treats every string from them as text (the
page's script escapes them), and a Content-Security-Policy that allows only the page's own inline
script (by hash) and requests to this origin is defence in depth against a record that
slips through.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources

from fastapi import FastAPI, Response
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from brigade import __version__
from brigade.dashboard.crawler import Crawler
from brigade.dashboard.schema import DashboardState

_NO_CACHE = {"Cache-Control": "no-store"}


@cache
def _page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy (hashes of its inline script and style)."""
    html = resources.files("brigade.dashboard").joinpath("static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        if not bodies:
            raise RuntimeError(f"the dashboard page has no inline <{tag}>")
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    # Styles may be inline (the coverage cells are coloured per layer); scripts only by hash.
    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src 'unsafe-inline'; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), policy


def create_app(crawler: Crawler) -> FastAPI:
    """The ASGI app; starting it (its lifespan) starts the crawler, stopping it stops the crawler."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        crawler.start()
        try:
            yield
        finally:
            await crawler.close()

    app = FastAPI(title="brigade swarm dashboard", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.add_middleware(GZipMiddleware, minimum_size=2048)

    @app.middleware("http")
    async def security_headers(request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        body, policy = _page()
        return Response(body, media_type="text/html; charset=utf-8",
                        headers={**_NO_CACHE, "Content-Security-Policy": policy})

    @app.get("/api/v1/state", response_model=DashboardState, summary="Every model, layer and peer, as last crawled")
    async def state() -> Response:
        # Pre-serialized once per crawl (the response_model above documents it for /openapi.json).
        return Response(crawler.state_json(), media_type="application/json", headers=_NO_CACHE)

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics() -> Response:
        return Response(crawler.metrics_text(), media_type=CONTENT_TYPE_LATEST, headers=_NO_CACHE)

    @app.get("/healthz", summary="Whether the dashboard itself works (not the swarm)")
    @app.head("/healthz", include_in_schema=False)  # for monitors that only ask HEAD
    async def healthz() -> JSONResponse:
        ok, detail = crawler.health()
        crawl = crawler.crawl_view()
        body = {"status": "ok" if ok else "failing", "detail": detail, "last_crawl_ok": crawl.ok,
                "last_success_at": crawl.last_success_at, "version": __version__}
        return JSONResponse(body, status_code=200 if ok else 503, headers=_NO_CACHE)

    return app
