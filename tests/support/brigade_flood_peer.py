"""A fake peer that floods a client with answers nobody asked for: an in-process grpc.aio server.

It opens any session it is asked to, then, without waiting for a step, streams step results of
``answer_bytes`` each, up to ``answers`` of them, as fast as the client takes them. An honest peer
answers each step with its chunks and nothing more; this one tests that a client's queue of a
hop's answers is bounded and that such a hop counts as failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc


class FloodPeer(pb_grpc.PeerServicer):
    def __init__(self, answer_bytes: int, answers: int):
        self.answer_bytes = answer_bytes
        self.answers = answers
        self.sent = 0  # answers written so far, all streams together
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self, max_message_bytes: int) -> FloodPeer:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_PeerServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    async def Inference(self, request_iterator: AsyncIterator[pb.InferenceRequest],
                        context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "open":
            return
        session_id = first.open.session_id
        await context.write(pb.InferenceResponse(opened=pb.SessionOpened(session_id=session_id, max_length=64)))
        junk = pb.Tensor(shape=[1, self.answer_bytes // 256, 64], dtype="float32", data=bytes(self.answer_bytes))
        for index in range(self.answers):
            await context.write(pb.InferenceResponse(result=pb.StepResult(
                step_id=10_000 + index, length=1, start_position=0, positions=1, hidden=junk)))
            self.sent += 1
