"""Cache squatting: one client identity opening sessions until refused holds at most its share of a
peer's KV cache pool (25% by default), is told so, and an honest client is still admitted; and it holds
at most ``max_sessions_per_client`` open sessions.

The guard's pool holds 4096 positions in pages of 64: 64 pages, so one identity may hold 16. A
session reserves one page when it opens and more as it grows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from brigade_inproc_peer import InProcessPeer
from brigade_peer_client import open_session
from brigade_security import GUARD_CACHE_TOKENS, SecuritySwarm

from brigade.peer.config import PeerConfig
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channels import dial
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import decode, encode

pytestmark = pytest.mark.timeout(180)

PAGE = PeerConfig.cache_page_tokens
SHARE = PeerConfig.client_cache_share
HIDDEN = 64


async def open_stream(stub: pb_grpc.PeerStub, info: dict[str, object], identity: Identity, session_id: str,
                      **fields: object) -> tuple[grpc.aio.StreamStreamCall, pb.InferenceResponse | None]:
    """Opens a session and keeps its stream open; (call, None) when the peer refused it (see call.code())."""
    call = stub.Inference()
    await call.write(open_session(info, session_id, identity=identity, start_layer=0, end_layer=6, **fields))
    try:
        response = await call.read()
    except grpc.aio.AioRpcError:
        return call, None
    return call, None if response is grpc.aio.EOF else response


async def step(call: grpc.aio.StreamStreamCall, session_id: str, positions: int, start: int = 0) -> torch.Tensor:
    hidden = torch.randn(1, positions, HIDDEN)
    await call.write(pb.InferenceRequest(session_id=session_id, step=pb.Step(hidden=encode(hidden),
                                                                             start_position=start, step_id=1)))
    response = await call.read()
    if response is grpc.aio.EOF:
        raise grpc.aio.AioRpcError(await call.code(), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   await call.details())
    return decode(response.result.hidden)


def test_one_identity_holds_at_most_its_share_and_others_are_still_served(security_swarm: SecuritySwarm) -> None:
    info = security_swarm.guard.info
    squatter, honest = Identity.generate(), Identity.generate()
    share_pages = int(GUARD_CACHE_TOKENS // PAGE * SHARE)

    async def run() -> None:
        channel = dial(str(info["address"]), str(info["tls_cert"]))
        stub = pb_grpc.PeerStub(channel)
        held: list[grpc.aio.StreamStreamCall] = []
        try:
            # The squatter opens sessions (one page each) until the peer says no.
            for index in range(4 * share_pages):
                call, opened = await open_stream(stub, info, squatter, f"squat-{index:04d}", batch_size=1,
                                                 max_length=512)
                if opened is None:
                    refusal = (await call.code(), await call.details())
                    break
                held.append(call)
            else:
                pytest.fail("the squatter was never refused")
            assert len(held) == share_pages, f"the squatter holds {len(held)} sessions, its share is {share_pages}"
            code, details = refusal
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert f"more than its share ({SHARE:.0%})" in details and squatter.peer_id in details, details
            status = await stub.Info(pb.InfoRequest(), timeout=10)
            used = status.cache_tokens - status.free_cache_tokens
            assert used <= SHARE * status.cache_tokens, (used, status.cache_tokens)

            # A bigger session, or growing one it holds, is refused the same way.
            call, opened = await open_stream(stub, info, squatter, "squat-wide", batch_size=4, max_length=64)
            assert opened is None and await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await step(held[0], "squat-0000", 2 * PAGE)  # needs a second page
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "share" in (caught.value.details() or "")

            # An honest client is admitted meanwhile, and computes.
            call, opened = await open_stream(stub, info, honest, "honest-beside-squatter", batch_size=1,
                                             max_length=256)
            assert opened is not None and opened.WhichOneof("kind") == "opened", await call.details()
            output = await step(call, "honest-beside-squatter", 2 * PAGE)
            assert output.shape == (1, 2 * PAGE, HIDDEN) and bool(torch.isfinite(output).all())
            await call.done_writing()
        finally:
            for call in held:
                call.cancel()
            await channel.close()

    asyncio.run(run())


def test_one_identity_holds_at_most_its_sessions_and_gets_them_back_when_it_closes(llama_checkpoint: Path) -> None:
    """The other per-client cap: open sessions (``max_sessions_per_client``, default 64; 3 here, with a
    pool big enough that the cache share never binds). Closing a session gives its slot back."""
    config = PeerConfig(model=str(llama_checkpoint), cache_tokens=4096, num_threads=1, max_sessions_per_client=3,
                        client_cache_share=1.0)
    client, other = Identity.generate(), Identity.generate()

    async def run(info: dict[str, object]) -> None:
        channel = dial(str(info["address"]), str(info["tls_cert"]))
        stub = pb_grpc.PeerStub(channel)
        held: list[grpc.aio.StreamStreamCall] = []
        try:
            for index in range(3):
                call, opened = await open_stream(stub, info, client, f"mine-{index:04d}", batch_size=1, max_length=64)
                assert opened is not None, await call.details()
                held.append(call)
            call, opened = await open_stream(stub, info, client, "mine-0003", batch_size=1, max_length=64)
            assert opened is None and await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = await call.details() or ""
            assert f"client {client.peer_id} already holds 3 sessions here" in details, details

            call, opened = await open_stream(stub, info, other, "theirs-0000", batch_size=1, max_length=64)
            assert opened is not None, await call.details()
            held.append(call)

            await held[0].done_writing()  # the client ends one session...
            assert await held[0].read() is grpc.aio.EOF
            for attempt in range(50):  # ...and may open another once the peer has closed it
                call, opened = await open_stream(stub, info, client, f"mine-again-{attempt:02d}", batch_size=1,
                                                 max_length=64)
                if opened is not None:
                    held.append(call)
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the closed session's slot never came back")
        finally:
            for call in held:
                call.cancel()
            await channel.close()

    with InProcessPeer(llama_checkpoint, config) as peer:
        asyncio.run(run(peer.info))
        assert peer.usage()["owners"].get(client.peer_id, 0) <= 3
