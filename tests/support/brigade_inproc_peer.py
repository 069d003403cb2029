"""A peer's real servicer, sessions and compute thread behind a real TLS gRPC server, in this process.

For fuzzing the servicer: hypothesis and atheris see every exception and every leaked session
directly, and atheris's coverage reaches the servicer's code, which a separate peer process would
hide. Everything else is the peer's own code (``PeerServer`` minus the DHT and the announcer): the
same ``PeerServicer``, ``SessionManager``, ``SpanExecutor``, span loading and TLS credentials.

The server runs on its own event loop thread; callers use it from any thread through ``info``
(shaped like a peer's ready line, so ``brigade_peer_client`` helpers work) and ``call``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from brigade.kernels.loading import load_config, load_span
from brigade.peer.config import PeerConfig
from brigade.peer.executor import SpanExecutor
from brigade.peer.servicer import PeerServicer
from brigade.peer.sessions import SessionManager
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_options import grpc_options
from brigade.protocol.identity import Identity
from brigade.protocol.tls import TlsIdentity

T = TypeVar("T")


class InProcessPeer:
    """``start()`` loads the span and serves it on 127.0.0.1; ``close()`` stops everything."""

    def __init__(self, checkpoint: Path, config: PeerConfig | None = None, identity: Identity | None = None):
        base = config or PeerConfig(model=str(checkpoint))
        self.config = replace(base, model=str(checkpoint), start_layer=base.start_layer or 0)
        self.identity = identity or Identity.generate()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="inproc-peer", daemon=True)
        self.server: grpc.aio.Server | None = None
        self.servicer: PeerServicer | None = None
        self.sessions: SessionManager | None = None
        self.executor: SpanExecutor | None = None
        self.tls: TlsIdentity | None = None
        self.info: dict[str, object] = {}

    def start(self) -> InProcessPeer:
        model_config = load_config(self.config.model)
        if self.config.end_layer is None:
            self.config = replace(self.config, end_layer=model_config.num_hidden_layers)
        assert self.config.start_layer is not None and self.config.end_layer is not None
        if self.config.cache_tokens is None:
            self.config = replace(self.config, cache_tokens=4096)
        span = load_span(self.config.model, self.config.start_layer, self.config.end_layer, dtype=torch.float32,
                         device="cpu", config=model_config)
        self._thread.start()
        self.call(self._start(span))
        return self

    async def _start(self, span: Any) -> None:
        config = self.config
        self.sessions = SessionManager(config, span.args, torch.float32, "cpu")
        self.executor = SpanExecutor(span, torch.float32, "cpu", config.num_threads,
                                     max_batch_tokens=config.max_batch_tokens,
                                     batch_window_s=config.batch_window_ms / 1000)
        self.executor.start()
        self.servicer = PeerServicer(config, "inproc", self.identity, self.sessions, self.executor,
                                     info_extra=lambda: {})
        self.server = grpc.aio.server(options=grpc_options(config.max_message_bytes))
        pb_grpc.add_PeerServicer_to_server(self.servicer, self.server)
        if config.insecure:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.tls = TlsIdentity.generate(self.identity.peer_id)
            port = self.server.add_secure_port("127.0.0.1:0", self.tls.server_credentials())
        await self.server.start()
        self.info = {"peer_id": self.identity.peer_id, "address": f"127.0.0.1:{port}",
                     "tls_cert": self.tls.cert_pem.decode() if self.tls else ""}

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Runs ``coroutine`` on the server's loop and returns its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def usage(self) -> dict[str, Any]:
        """What the peer holds now: sessions, free pool pages, per-owner books (all must drain to empty)."""

        async def read() -> dict[str, Any]:
            assert self.sessions is not None
            sessions = self.sessions
            books = sessions.kv.books()
            return {"sessions": len(sessions.sessions), "free_tokens": sessions.kv.free_tokens,
                    "capacity_tokens": sessions.kv.capacity_tokens,
                    "owners": {owner: held for owner, (held, _) in books.items()},
                    "owner_pages": {owner: pages for owner, (_, pages) in books.items()}}

        return self.call(read(), 10.0)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            if self.server is not None:
                await self.server.stop(grace=0.5)
            if self.servicer is not None:
                await self.servicer.close()

        try:
            self.call(stop(), 15.0)
        finally:
            if self.executor is not None:
                self.executor.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)

    def __enter__(self) -> InProcessPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
