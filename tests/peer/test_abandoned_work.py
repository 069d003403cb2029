"""Work nobody waits for costs a peer nothing: not its cache pages, not its compute thread.

- A client that opens a session, sends steps and never reads their answers: the peer's writes to it
  stop at a deadline, and its pages come back within the idle timeout (the peer's free cache, as its
  Info reports it). The client's channel keeps a small receive window so the peer's writes block.
- 50 sessions that each send a 4,000-position prefill and cancel their call (10 ms after sending
  it), then 200 ``Forward`` calls with 10 ms deadlines: once they have ended, the peer computes
  nothing more for them but the pass then in progress (counted by the computed-items counter of its
  Info), and an honest session's decode latency right after the flood stays within 2x of its
  baseline (5 ms floor for timer noise), instead of waiting behind the dead work.

The peer is a real process; the clients are hand-driven grpc.aio calls in this process.
"""

from __future__ import annotations

import asyncio
import statistics
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
POOL = 16384  # positions
IDLE_S = 2.0  # the peer's --session-idle-timeout
CHUNK = 128  # FAST_PEER_ARGS' --prefill-chunk-tokens
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    folder = tmp_path_factory.mktemp("abandoned")
    checkpoint = build_checkpoint(folder / "long-llama", "llama", max_position_embeddings=4096)
    swarm = LocalSwarm(folder / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        launched = swarm.add_peer(str(checkpoint), (0, 6), extra_args=[
            *FAST_PEER_ARGS, "--cache-tokens", str(POOL), "--session-idle-timeout", str(IDLE_S),
            "--client-cache-share", "1.0"])
        yield dict(launched.info)
    finally:
        swarm.close()


def _channel(info: dict[str, object], options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=str(info["tls_cert"]).encode())
    return grpc.aio.secure_channel(str(info["address"]), credentials,
                                   options=[*(options or []), *TLS_CHANNEL_OPTIONS])


async def _info(stub: pb_grpc.PeerStub) -> pb.InfoResponse:
    return await stub.Info(pb.InfoRequest(), timeout=10)


async def _wait_quiet(stub: pb_grpc.PeerStub, timeout_s: float = 30.0) -> pb.InfoResponse:
    """The peer's Info once its compute thread has made no pass for half a second."""
    deadline = time.monotonic() + timeout_s
    last = await _info(stub)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await _info(stub)
        if now.compute_passes == last.compute_passes:
            return now
        last = now
    raise AssertionError(f"the peer kept computing for {timeout_s} s")


def _step(session_id: str, positions: int, start: int) -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, step=pb.Step(
        hidden=encode(torch.randn(1, positions, HIDDEN)), start_position=start))


def test_a_client_that_stops_reading_gets_its_pages_taken_back(peer: dict[str, object]) -> None:
    async def scenario() -> None:
        async with _channel(peer) as control, _channel(peer, SMALL_WINDOW) as lazy:
            stub = pb_grpc.PeerStub(control)
            free_before = (await _info(stub)).free_cache_tokens
            call = pb_grpc.PeerStub(lazy).Inference()
            await call.write(open_session(peer, "never-reads", identity=Identity.generate(), start_layer=0,
                                          end_layer=6, batch_size=1, max_length=4096))
            assert (await call.read()).WhichOneof("kind") == "opened"  # the last answer it ever reads
            assert (await _info(stub)).free_cache_tokens < free_before
            last_sent = time.monotonic()
            for _ in range(12):  # ~6 MiB of answers, far past what its window holds
                try:  # the peer may end the call first: it stops waiting for this client after IDLE_S
                    await asyncio.wait_for(call.write(_step("never-reads", 2048, 0)), 30)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                    break
                last_sent = time.monotonic()
            while (await _info(stub)).free_cache_tokens != free_before:
                assert time.monotonic() - last_sent < IDLE_S + 6.0, (
                    f"the non-reading session still holds its pages {time.monotonic() - last_sent:.1f} s after its "
                    f"last step (idle timeout {IDLE_S} s)")
                await asyncio.sleep(0.1)
            call.cancel()
            info = await _info(stub)
            assert info.open_sessions == 0

    asyncio.run(scenario())


async def _honest_latencies(stub: pb_grpc.PeerStub, info: dict[str, object], session_id: str,
                            steps: int) -> list[float]:
    call = stub.Inference()
    await call.write(open_session(info, session_id, identity=Identity.generate(), start_layer=0, end_layer=6,
                                  batch_size=1, max_length=256))
    assert (await call.read()).WhichOneof("kind") == "opened"
    await call.write(_step(session_id, 16, 0))
    await call.read()
    latencies = []
    for index in range(steps):
        began = time.perf_counter()
        await call.write(_step(session_id, 1, 16 + index))
        async with asyncio.timeout(30):
            answer = await call.read()
        latencies.append(time.perf_counter() - began)
        assert answer.WhichOneof("kind") == "result", answer
    await call.done_writing()
    call.cancel()
    return latencies


async def _cancelled_prefill(stub: pb_grpc.PeerStub, info: dict[str, object], index: int) -> None:
    session_id = f"cancelled-{index}"
    call = stub.Inference()
    await call.write(open_session(info, session_id, identity=Identity.generate(), start_layer=0, end_layer=6,
                                  batch_size=1, max_length=4096))
    assert (await call.read()).WhichOneof("kind") == "opened"
    await call.write(_step(session_id, 4000, 0))
    await asyncio.sleep(0.01)  # long enough for the peer to take the step in and queue it
    call.cancel()


async def _expired_forward(stub: pb_grpc.PeerStub, info: dict[str, object], hidden: pb.Tensor) -> None:
    request = pb.ForwardRequest(start_layer=0, end_layer=6, hidden=hidden, token=forward_token(info))
    try:
        await stub.Forward(request, timeout=0.010)
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED), error


def test_cancelled_prefills_and_expired_forwards_are_not_computed(peer: dict[str, object]) -> None:
    async def scenario() -> None:
        async with _channel(peer) as channel:
            stub = pb_grpc.PeerStub(channel)
            baseline = statistics.median(await _honest_latencies(stub, peer, "honest-before", 12))
            before = await _wait_quiet(stub)
            for index in range(50):
                await _cancelled_prefill(stub, peer, index)
            hidden = encode(torch.randn(1, 1024, HIDDEN))
            await asyncio.gather(*(_expired_forward(stub, peer, hidden) for _ in range(200)))
            ended = await _info(stub)  # every flood call has ended by now
            after_flood = statistics.median(await _honest_latencies(stub, peer, "honest-after", 12))
            after = await _wait_quiet(stub)
            honest_items = 1 + 12  # an honest session: one prefill chunk, then 12 decode steps
            late_items = after.computed_steps - ended.computed_steps - honest_items
            # Once its call has ended, nothing of the flood is computed but the pass then in progress
            # (at most one chunk of each prefill batched into it). Computing it all would be 50 x 32
            # prefill chunks and 200 passes; while each call lived, a chunk or two of it could run.
            assert late_items <= 16, f"the peer computed {late_items} items of abandoned work after it ended"
            flood_items = after.computed_steps - before.computed_steps - 2 * honest_items
            assert flood_items <= 3 * 50 + 20, f"the peer computed {flood_items} items of the flood"
            assert after.open_sessions == 0
            assert after_flood <= 2 * max(baseline, 0.005), (
                f"honest decode latency {after_flood * 1000:.1f} ms after the flood, baseline {baseline * 1000:.1f} ms")

    asyncio.run(scenario())
