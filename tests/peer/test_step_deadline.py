"""A step or pass past the peer's step deadline ends its call with DEADLINE_EXCEEDED, promptly.

The deadline (``--step-timeout``) is configured short here, so that a batch of 4,000-position
prefills outlasts it: the session's stream must end with a typed status (the client routes
around it), not hang with its reader dead, and a ``Forward`` pass must not end as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from brigade_peer_client import forward_token, open_session
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS, build_checkpoint

from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode
from brigade.protocol.tls import TLS_CHANNEL_OPTIONS

pytestmark = pytest.mark.timeout(120)

HIDDEN = 64
STEP_TIMEOUT_S = 0.1


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    folder = tmp_path_factory.mktemp("deadline")
    checkpoint = build_checkpoint(folder / "long-llama", "llama", max_position_embeddings=4096)
    swarm = LocalSwarm(folder / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        launched = swarm.add_peer(str(checkpoint), (0, 6), extra_args=[
            *FAST_PEER_ARGS, "--cache-tokens", "16384", "--client-cache-share", "1.0",
            "--step-timeout", str(STEP_TIMEOUT_S)])
        yield dict(launched.info)
    finally:
        swarm.close()


def _channel(info: dict[str, object]) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=str(info["tls_cert"]).encode())
    return grpc.aio.secure_channel(str(info["address"]), credentials, options=TLS_CHANNEL_OPTIONS)


def test_a_step_past_the_deadline_ends_its_stream_with_deadline_exceeded(peer: dict[str, object]) -> None:
    async def scenario() -> None:
        async with _channel(peer) as channel:
            stub = pb_grpc.PeerStub(channel)
            call = stub.Inference()
            await call.write(open_session(peer, "slow-step", identity=Identity.generate(), start_layer=0,
                                          end_layer=6, batch_size=4, max_length=4096))
            assert (await call.read()).WhichOneof("kind") == "opened"
            await call.write(pb.InferenceRequest(session_id="slow-step", step=pb.Step(
                hidden=encode(torch.randn(4, 4000, HIDDEN)), start_position=0)))
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(20):
                    while True:  # chunks computed before the deadline may come first
                        await call.read()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert time.monotonic() - began < 10
            info = await stub.Info(pb.InfoRequest(), timeout=10)
            for _ in range(50):
                if info.open_sessions == 0:
                    break
                await asyncio.sleep(0.1)
                info = await stub.Info(pb.InfoRequest(), timeout=10)
            assert info.open_sessions == 0 and info.free_cache_tokens == info.cache_tokens

    asyncio.run(scenario())


def test_a_forward_pass_past_the_deadline_is_deadline_exceeded_not_unknown(peer: dict[str, object]) -> None:
    async def scenario() -> None:
        async with _channel(peer) as channel:
            stub = pb_grpc.PeerStub(channel)
            request = pb.ForwardRequest(start_layer=0, end_layer=6, hidden=encode(torch.randn(4, 4000, HIDDEN)),
                                        token=forward_token(peer))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Forward(request, timeout=20)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert "deadline" in (caught.value.details() or "")

    asyncio.run(scenario())
