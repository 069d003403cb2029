"""A write to a hop that takes no data (frozen peer, full flow-control window) fails that hop in bounded time.

The soak benchmark once saw a generation outlive its run by 300 s; a write without a deadline is
one wait that could do that. This pins the bound on every write to a hop's stream.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from brigade.client import hops
from brigade.client.hops import HopFailure, HopStream
from brigade.protocol import brigade_pb2 as pb


class _StuckCall:
    """A stream call whose writes never complete, as to a SIGSTOPped peer once the window is full."""

    async def write(self, request: pb.InferenceRequest) -> None:
        await asyncio.Event().wait()


def test_a_write_that_never_completes_is_the_hops_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hops, "SEND_TIMEOUT_FLOOR_S", 0.2)
    peer = SimpleNamespace(peer_id="bpStuck", address="127.0.0.1:1")
    stream = HopStream(hop=SimpleNamespace(peer=peer, start=0, end=2), session_id="s", call=_StuckCall(),
                       swarm=None)  # type: ignore[arg-type]
    began = time.monotonic()
    with pytest.raises(HopFailure, match="took no data"):
        asyncio.run(stream.send(pb.InferenceRequest(session_id="s")))
    assert time.monotonic() - began < 2.0
