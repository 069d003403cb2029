"""A peer that streams answers nobody asked for cannot fill the client's memory: the client's queue of
one hop's answers is bounded (in answers and bytes), and a hop past the bound has failed.

The peer is a fake (``brigade_flood_peer``): it opens the session, then sends 1 MiB step results
without being asked, up to 200 MiB. The client (a real ``HopStream``) must hold at most its bound
of them, drop the rest with the call, and answer the session's next wait with a ``HopFailure``.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from brigade_flood_peer import FloodPeer

from brigade.client.config import ClientConfig
from brigade.client.hops import HopFailure, HopStream, answer_queue_limits
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord
from brigade.routing.route import Hop

pytestmark = pytest.mark.timeout(60)

MESSAGE_CAP = 8 * 1024 * 1024


def test_a_hop_that_floods_unrequested_answers_is_bounded_and_fails() -> None:
    async def scenario() -> None:
        peer = await FloodPeer(answer_bytes=1 << 20, answers=200).start(MESSAGE_CAP)
        config = ClientConfig(max_message_bytes=MESSAGE_CAP, allow_insecure=True)
        max_answers, max_bytes = answer_queue_limits(config)
        assert max_bytes <= 4 * MESSAGE_CAP
        channel = grpc.aio.insecure_channel(peer.address, options=[
            ("grpc.max_receive_message_length", MESSAGE_CAP), ("grpc.max_send_message_length", MESSAGE_CAP)])
        record = PeerRecord(peer_id="flood", public_key="00", address=peer.address, model_name="m", start_layer=0,
                            end_layer=6, num_layers=6, dtype="float32", quantization="none", state="online",
                            signed_at=0.0)
        swarm = SimpleNamespace(config=config, identity=Identity.generate(), hidden_size=64,
                                stub=lambda _record: pb_grpc.PeerStub(channel))
        try:
            stream = await HopStream.open(swarm, Hop(record, 0, 6), batch_size=1, max_length=64,  # type: ignore[arg-type]
                                          pad_lengths=[0])
            for _ in range(100):  # the flood arrives while nobody reads (the client computes its head, say)
                await asyncio.sleep(0.05)
                if peer.sent >= 200 or stream.queued_bytes >= max_bytes or stream.ended:
                    break
            assert stream.queued_bytes <= max_bytes, f"{stream.queued_bytes} bytes of answers queued"
            assert peer.sent < 200, "the client kept taking unrequested answers to the end of the flood"
            with pytest.raises(HopFailure, match="answers nobody asked for"):
                for _ in range(max_answers + 1):
                    await stream.answer(5.0)
            await stream.close()
        finally:
            await channel.close()
            await peer.stop()

    asyncio.run(scenario())
