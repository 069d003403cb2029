"""A client that sends steps and never reads makes a peer neither compute ahead nor buffer answers.

Its steps restart at position 0 (the cache stays one page), each 32 x 64 positions of width 64 in
float32 (512 KiB in, 512 KiB out). The peer's answers to it are bounded in bytes (peer/outbox.py):
once they fill, the step waits for the client to read, the stream stops reading, and the client's
own writes stall. So the peer computes only a handful of its steps (the computed-items counter of
its Info) and its resident memory (``VmRSS`` of the peer process) grows by a few MiB, not by every
answer (~120 MiB for the 240 steps sent); and the session is freed within the idle timeout.

The peer is a real process; the client is a hand-driven grpc.aio call with a small receive window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from brigade_peer_client import open_session
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS, build_checkpoint

from brigade.deploy.launcher import LocalSwarm
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode
from brigade.protocol.tls import TLS_CHANNEL_OPTIONS

pytestmark = pytest.mark.timeout(120)

HIDDEN = 64
BATCH = 32
POSITIONS = 64  # one chunk per step (FAST_PEER_ARGS' --prefill-chunk-tokens is 128)
STEPS = 240  # 120 MiB of answers; the session's input cap (4 x its span) allows 256 such steps
IDLE_S = 3.0
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, object], int]]:
    folder = tmp_path_factory.mktemp("outbox")
    checkpoint = build_checkpoint(folder / "llama", "llama", max_position_embeddings=4096)
    swarm = LocalSwarm(folder / "logs", peer_threads=PEER_THREADS)
    try:
        swarm.start_bootstrap()
        launched = swarm.add_peer(str(checkpoint), (0, 6), extra_args=[
            *FAST_PEER_ARGS, "--cache-tokens", "65536", "--session-idle-timeout", str(IDLE_S),
            "--client-cache-share", "1.0"])
        yield dict(launched.info), launched.process.pid
    finally:
        swarm.close()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _channel(info: dict[str, object], options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=str(info["tls_cert"]).encode())
    return grpc.aio.secure_channel(str(info["address"]), credentials,
                                   options=[*(options or []), *TLS_CHANNEL_OPTIONS])


def _step(session_id: str) -> pb.InferenceRequest:
    return pb.InferenceRequest(session_id=session_id, step=pb.Step(
        hidden=encode(torch.randn(BATCH, POSITIONS, HIDDEN)), start_position=0))


def _open(info: dict[str, object], session_id: str) -> pb.InferenceRequest:
    return open_session(info, session_id, identity=Identity.generate(), start_layer=0, end_layer=6,
                        batch_size=BATCH, max_length=4096)


async def _honest_round(stub: pb_grpc.PeerStub, info: dict[str, object]) -> None:
    """A few steps of the same shape, read: warms the peer (allocator, kernels) before the baseline."""
    call = stub.Inference()
    await call.write(_open(info, "warm-up-session"))
    assert (await call.read()).WhichOneof("kind") == "opened"
    for _ in range(8):
        await call.write(_step("warm-up-session"))
        assert (await call.read()).WhichOneof("kind") == "result"
    await call.done_writing()
    call.cancel()


async def _flood(call: grpc.aio.StreamStreamCall, sent: list[float]) -> None:
    for _ in range(STEPS):
        try:
            await call.write(_step("never-reads"))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return
        sent.append(time.monotonic())


def test_a_client_that_never_reads_gets_no_work_done_ahead(peer: tuple[dict[str, object], int]) -> None:
    info, pid = peer

    async def scenario() -> None:
        async with _channel(info) as control, _channel(info, SMALL_WINDOW) as lazy:
            stub = pb_grpc.PeerStub(control)
            await _honest_round(stub, info)
            await asyncio.sleep(0.5)
            before = await stub.Info(pb.InfoRequest(), timeout=10)
            baseline = _rss_mib(pid)
            call = pb_grpc.PeerStub(lazy).Inference()
            await call.write(_open(info, "never-reads"))
            assert (await call.read()).WhichOneof("kind") == "opened"  # the last answer it ever reads
            began = time.monotonic()
            sent: list[float] = []
            flood = asyncio.create_task(_flood(call, sent))
            peak = baseline
            freed_at = None
            while time.monotonic() - began < IDLE_S + 10.0:
                peak = max(peak, _rss_mib(pid))
                now = await stub.Info(pb.InfoRequest(), timeout=10)
                if now.open_sessions == 0:
                    freed_at = time.monotonic()
                    break
                await asyncio.sleep(0.1)
            call.cancel()
            flood.cancel()
            await asyncio.gather(flood, return_exceptions=True)
            after = await stub.Info(pb.InfoRequest(), timeout=10)
            computed = after.computed_steps - before.computed_steps
            assert computed <= 40, f"the peer computed {computed} steps ahead of a client that read none"
            assert peak - baseline < 48, (
                f"the peer's memory grew by {peak - baseline:.0f} MiB for a client that read nothing")
            assert freed_at is not None, f"the session was still open {IDLE_S + 10:g} s after its steps began"
            last = sent[-1] if sent else began
            assert freed_at - last < IDLE_S + 4.0, (
                f"the session was freed {freed_at - last:.1f} s after its last step (idle timeout {IDLE_S} s)")

    asyncio.run(scenario())
