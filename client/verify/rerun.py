"""A check's re-run: the checked hop's inputs as one ordinary session on another peer serving its layers.

To the re-running peer it is an ordinary session: same client identity, batch, padding and length,
one prefill (in messages under the cap, as any long step), with the call lengths of the window as it
finished. What it answers must be the
positions asked, signed for what it returned; else it is a bad witness and another peer is asked.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from brigade.client.chunks import even_pieces
from brigade.client.hops import HopFailure, HopStream
from brigade.client.verify.compare import choose_checker, pair_tolerance
from brigade.client.verify.evidence import Link
from brigade.client.verify.outcomes import Skip, VerificationStats
from brigade.client.verify.windows import Window
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import check_attestation, rope_digest
from brigade.protocol.errors import BadAnswerError, BrigadeError
from brigade.protocol.messages import Step, StepAnswer
from brigade.protocol.records import PeerRecord
from brigade.protocol.tensors import WIRE_DTYPES, encode
from brigade.routing.route import Hop

if TYPE_CHECKING:
    from brigade.client.standing import PeerStanding
    from brigade.client.verify.verifier import SessionView

logger = logging.getLogger(__name__)

CHECKER_TRIES = 2  # re-running peers tried in turn when one fails


@dataclass
class Rerun:
    peer: PeerRecord
    outputs: torch.Tensor  # [B, b - a, H]: the window's positions
    links: list[Link]  # its attestations over [0, b)
    session_id: str


class BadWitness(Exception):
    """A re-running peer answered something malformed: ask another one."""


class Rerunner:
    """Re-runs one hop's window on peers other than the ones it is told to avoid."""

    def __init__(self, view: SessionView, standing: PeerStanding, layers: tuple[int, int], window: Window,
                 rng: random.Random, stats: VerificationStats):
        self.view, self.standing, self.layers, self.window = view, standing, layers, window
        self.config = view.config
        self._rng = rng
        self.stats = stats
        self._wire = WIRE_DTYPES[self.config.wire_dtype]

    async def somewhere(self, against: list[PeerRecord], inputs: torch.Tensor) -> Rerun:
        """Re-runs ``inputs`` on the best peer for the layers independent of ``against`` (another if it fails)."""
        layers = self.layers
        scale = self.config.verify_tolerance_scale
        records = await self.view.swarm.records()
        busy = {stream.peer_id for stream in self.view.hops}
        tried: set[str] = set()
        for _ in range(CHECKER_TRIES):
            exclude = self.standing.excluded() | tried
            checker = choose_checker(records, layers, against, exclude, busy,  # tightest with the suspect
                                     lambda r: pair_tolerance(against[0], r, scale), self._rng)
            if checker is None:
                break
            tried.add(checker.peer_id)
            try:
                return await self.on(checker, inputs)
            except (HopFailure, BrigadeError, grpc.RpcError, BadWitness) as error:
                logger.info("result check: re-running layers %d:%d on %s failed: %s", *layers, checker.peer_id, error)
        if not tried:
            raise Skip("no_checker", f"no other peer serves layers {layers[0]}:{layers[1]}")
        raise Skip("checker_failed", f"re-running on {sorted(tried)} failed")

    async def on(self, record: PeerRecord, inputs: torch.Tensor) -> Rerun:
        """One ordinary session on ``record``: open, one prefill of ``inputs`` ([B, b, H]), close."""
        session, layers = self.view, self.layers
        stream = await HopStream.open(
            session.swarm, Hop(record, *layers), batch_size=session.batch_size, max_length=session.max_length,
            pad_lengths=session.pad_lengths, keep_outputs=True,  # as every session of a verifying client
        )
        try:
            length = inputs.shape[1]
            stream.ask(length)  # all of it is sent before any answer is read: its queue must hold them
            for start, end in even_pieces(0, length, session.message_positions()):  # under the message cap
                hidden = await asyncio.to_thread(encode, inputs[:, start:end], self._wire)
                await stream.send(pb.InferenceRequest(session_id=stream.session_id, step=Step.proto(
                    hidden, start, 1, length, self.window.rope_lengths[start:end])))
            pieces: list[torch.Tensor] = []
            links: list[Link] = []
            public_key = bytes.fromhex(record.public_key)
            covered = 0
            while covered < length:
                response = await stream.answer(self.config.step_timeout_s)
                if response.WhichOneof("kind") != "result":
                    continue
                try:
                    answer = await asyncio.to_thread(
                        StepAnswer.from_proto, response.result, expected_start=covered, remaining=length - covered,
                        batch=session.batch_size, width=inputs.shape[2], wire_dtype=self._wire)
                except BadAnswerError as error:
                    raise BadWitness(str(error)) from error
                att = answer.attestation
                rope = rope_digest(self.window.rope_lengths[covered : covered + answer.positions])
                if (answer.hidden is None or att.session_id != stream.session_id
                        or (att.start_layer, att.end_layer) != layers or att.start_position != covered
                        or att.rope_sha256 != rope or att.output_sha256 != answer.hidden.digest
                        or not check_attestation(att, public_key)):
                    raise BadWitness("its attestation does not match what it returned")
                pieces.append(answer.hidden.tensor)
                links.append(Link(att, answer.positions))
                covered += answer.positions
            self.stats.rerun_positions += length * session.batch_size
            return Rerun(record, torch.cat(pieces, dim=1)[:, self.window.start :], links, stream.session_id)
        finally:
            stream.cancel()
