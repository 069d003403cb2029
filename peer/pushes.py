"""What a receiving peer checks of a push's attestation before vouching for it to the client.

A previous hop that forwards its output signs an attestation of the bytes (``Step.pushed_by``),
the same one it answers its client with. The receiving peer echoes it in each result computed
from the push (``StepResult.upstream``), but only after checking that it is the pusher's own valid
signature over exactly the bytes received, at the position received, for the layers just before
this session's. Then a handover can no longer be disputed by either side: a pusher that sends other
bytes than it tells its client has signed two outputs for one position (the client distrusts it),
and a receiver that signs another input than the push it echoes contradicts itself. A push whose
attestation does not check out is still computed (the client's step is not lost), but unvouched:
the client links around the pair and feeds the next hop itself (``client/handover.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from brigade.peer.outbox import post
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import check_attestation, tensor_digest
from brigade.protocol.errors import BrigadeError, InvalidRequestError, PermissionDeniedError
from brigade.protocol.messages import Step
from brigade.protocol.tensors import TensorLimits
from brigade.protocol.tickets import TicketError, check_ticket

logger = logging.getLogger(__name__)


def vouched_push(step: pb.Step, pusher: str, pusher_key: bytes, first_layer: int,
                 digest: bytes | None = None) -> pb.Attestation | None:
    """``step.pushed_by`` when it is ``pusher``'s signature over exactly ``step``'s bytes; else None (logged).

    ``digest``: ``tensor_digest(step.hidden)`` when the caller already has it (the step then reuses it)."""
    if not step.HasField("pushed_by"):
        problem = "carries no attestation"
    else:
        att = step.pushed_by
        problem = ""
        if att.peer_id != pusher:
            problem = "carries an attestation of another peer"
        elif (att.start_position, att.step_id, att.end_layer) != (step.start_position, step.step_id, first_layer):
            problem = "carries an attestation for another step, other positions or layers"
        elif att.output_sha256 != (tensor_digest(step.hidden) if digest is None else digest):
            problem = "carries an attestation of other bytes"
        elif not check_attestation(att, pusher_key):
            problem = "carries an attestation that is not validly signed"
        if not problem:
            return att
    logger.info("a push from %s at position %d %s: computed, but not vouched for", pusher[:64], step.start_position,
                problem)
    return None


MAX_REFUSALS_TOLD = 4  # per session: a pusher re-attaching to refuse again cannot fill the client's stream


def take_push(session: Any, step: pb.Step, limits: TensorLimits, width: int) -> Step:
    """``_take_push``, and a refusal also told to the client (``PushRefused``, a few per session at most),
    which unlinks the pair at once instead of waiting out a step deadline (a prefill's is 120 s)."""
    try:
        return _take_push(session, step, limits, width)
    except PermissionDeniedError as error:
        if session.push_refusals_told < MAX_REFUSALS_TOLD:
            session.push_refusals_told += 1
            post(session, pb.InferenceResponse(push_refused=pb.PushRefused(step_id=step.step_id,
                                                                          reason=str(error)[:300])))
        raise


def _take_push(session: Any, step: pb.Step, limits: TensorLimits, width: int) -> Step:
    """The push as a checked ``Step``, if it is what a push must be before anything is spent on it: its
    client's ticket for the step (when the client gave this session a push key: ``protocol/tickets.py``),
    in order (``check_continues``), and a well-formed step (``Step.from_proto``).

    A refusal does not end the client's session: a made-up, repeated or rewound push comes from the
    pusher, and ending the receiver's session for it would get an honest receiver banned. Only the push
    stream ends, and the pair is unlinked (``take_push`` tells the client), nobody banned.
    """
    shape = step.hidden.shape
    if len(shape) != 3 or not 1 <= shape[1] <= session.max_length:
        raise PermissionDeniedError(f"push refused: hidden states of shape {list(shape)[:4]}")
    positions = shape[1]
    if session.push_key:
        try:
            check_ticket(session.push_key, session.session_id, step, positions, session.last_push)
        except TicketError as error:
            logger.warning("a push into session %s refused: %s", session.session_id[:64], error)
            raise PermissionDeniedError(f"push refused: {error}") from error
    try:
        parsed = Step.from_proto(step, limits, batch=session.batch_size, width=width, max_length=session.max_length,
                                 digest=tensor_digest(step.hidden))  # hashed once: the vouching reuses it
        session.last_push = check_continues(session.last_push, step, positions)
        return parsed
    except BrigadeError as error:
        raise PermissionDeniedError(f"push refused: {error}") from error


def check_continues(last: tuple[int, int] | None, step: pb.Step, positions: int) -> tuple[int, int]:
    """The (step id, end) a push leaves, if it continues the last one's step or starts a newer step.

    An honest previous hop pushes each step once, in order: its chunks contiguous, a retry or a new
    step under a larger step id (a client's ids only grow). A push that repeats or rewinds positions
    of a step already taken would make this peer compute and sign one (step, position) twice, or
    quietly rewrite its cache under a result the client never reads: refused (InvalidRequestError;
    ``take_push`` ends the push stream only).
    """
    if last is not None:
        last_step, last_end = last
        if step.step_id < last_step or (step.step_id == last_step and step.start_position != last_end):
            raise InvalidRequestError(f"a push must continue step {last_step} at position {last_end} or start a "
                                      f"newer step, not step {step.step_id} at {step.start_position}")
    return step.step_id, step.start_position + positions
