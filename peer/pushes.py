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

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import check_attestation, tensor_digest
from brigade.protocol.errors import InvalidRequestError, PermissionDeniedError
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


def take_push(session: Any, step: pb.Step) -> None:
    """What a push must be before anything is spent on it: its client's ticket for the step (when the
    client gave this session a push key: ``protocol/tickets.py``), then in order (``check_continues``).

    A refusal is not posted to the client's stream: a made-up, repeated or rewound push comes from the
    pusher, and ending the receiver's session for it would get an honest receiver banned. Only the push
    stream ends; the client's step then times out on this hop and the pair is unlinked (its previous
    hop's forward error says why), nobody banned for the pusher's word.
    """
    shape = step.hidden.shape
    positions = shape[1] if len(shape) == 3 else 0
    if session.push_key:
        try:
            check_ticket(session.push_key, session.session_id, step, positions, session.last_push)
        except TicketError as error:
            logger.warning("a push into session %s refused: %s", session.session_id[:64], error)
            raise PermissionDeniedError(f"push refused: {error}") from error
    session.last_push = check_continues(session.last_push, step, positions)


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
