"""A recording TCP proxy: everything that crosses a loopback link, both directions, kept for inspection.

Built on ``brigade.deploy.delay_proxy`` (with no delay): what a passive eavesdropper on the link
between a client and a peer would see, without tshark or root.
"""

from __future__ import annotations

import asyncio

from brigade.deploy.delay_proxy import DelayProxy, LinkProfile, ProxyThread


class _Tap:
    """Wraps a stream reader: every chunk read is also appended to the proxy's capture."""

    def __init__(self, reader: asyncio.StreamReader, proxy: RecordingProxy):
        self._reader = reader
        self._proxy = proxy

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self._proxy.record(data)
        return data


class RecordingProxy(DelayProxy):
    """A DelayProxy that keeps up to ``max_bytes`` of what it forwards (both directions, in arrival order)."""

    def __init__(self, target_host: str, target_port: int, max_bytes: int = 256 * 1024 * 1024):
        super().__init__(target_host, target_port, LinkProfile())
        self.max_bytes = max_bytes
        self.captured = bytearray()

    def record(self, data: bytes) -> None:
        room = self.max_bytes - len(self.captured)
        if room > 0:
            self.captured += data[:room]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await super()._pipe(_Tap(reader, self), writer)  # type: ignore[arg-type]


class CaptureThread(ProxyThread):
    """A RecordingProxy on its own loop thread: ``with CaptureThread("127.0.0.1:5000") as tap: ... tap.captured``."""

    def __init__(self, target: str, max_bytes: int = 256 * 1024 * 1024):
        super().__init__(target, LinkProfile())
        host, port = target.rsplit(":", 1)
        self.proxy = RecordingProxy(host, int(port), max_bytes)

    @property
    def captured(self) -> bytes:
        assert isinstance(self.proxy, RecordingProxy)
        return bytes(self.proxy.captured)
