"""Push tickets: the client's word, carried by a push, that the pushed step is one it sent.

With forwarding, a hop's input comes from the previous hop, not from the client. A step id is the
client's, so a peer receiving a push cannot tell a real newer step from one its upstream made up
(``peer/pushes.py`` ``check_continues`` only keeps pushes in order): a malicious upstream could push
a made-up step that rewinds and rewrites the receiver's cache, whose results the client skips as
stale, so that the receiver's later outputs are wrong and a check blames the receiver.

So the client gives each session it opens a random key (``OpenSession.push_key``, over the session's
own TLS stream; the peer never sends it on) and puts in each step it sends one ticket per session the
step will be pushed into: an HMAC under that session's key of (session, step id, step start, step
positions). Hops pass tickets on unchanged. A receiver computes a push only with a valid ticket for
its own session whose step the push stays inside; a made-up step has none, and an old ticket's step
id is refused by ``check_continues``. Each tag also covers the later tickets (``run_tickets``), so a
hop cannot strip or alter a later hop's ticket without its own next hop refusing the push. HMAC, not
a signature: one hash per ticket on the hot path.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence

from brigade.protocol import brigade_pb2 as pb

PUSH_KEY_BYTES = 32
TAG_BYTES = 32
MAX_TICKETS = 64  # per step: one per later hop of a run; a route is never this long


class TicketError(Exception):
    """A push without this client's valid ticket for its step: not computed."""


def new_push_key() -> bytes:
    return os.urandom(PUSH_KEY_BYTES)


def ticket_tag(key: bytes, session_id: str, step_id: int, step_start: int, step_positions: int,
               later: bytes = b"") -> bytes:
    """HMAC-SHA256 under ``key`` of the step and ``later`` (``chain_digest`` of the tickets after this one)."""
    message = session_id.encode() + struct.pack("!QII", step_id, step_start, step_positions) + later
    return hmac.new(key, message, hashlib.sha256).digest()


def chain_digest(entries: Sequence[pb.PushTicket]) -> bytes:
    """What a ticket's tag also covers: every later ticket of the run, in order ("" when there is none)."""
    if not entries:
        return b""
    digest = hashlib.sha256()
    for entry in entries:  # every field length-prefixed: no two lists of tickets hash alike
        session = entry.session_id.encode()
        digest.update(struct.pack("!III", len(session), entry.step_start, len(entry.tag)) + session + entry.tag)
    return digest.digest()


def ticket(key: bytes, session_id: str, step_id: int, step_start: int, step_positions: int,
           later: bytes = b"") -> pb.PushTicket:
    return pb.PushTicket(session_id=session_id, step_start=step_start,
                         tag=ticket_tag(key, session_id, step_id, step_start, step_positions, later))


def run_tickets(receivers: Sequence[tuple[bytes, str]], step_id: int, step_start: int,
                step_positions: int) -> list[pb.PushTicket]:
    """The tickets of one step for the sessions it will be pushed into, (key, session id) in run order.

    Each tag also covers the tickets after it, so a hop that drops or alters a later hop's ticket makes
    its own next hop refuse the push: the pair it broke is its own, not an honest pair further on.
    """
    tickets: list[pb.PushTicket] = []
    for key, session_id in reversed(receivers):
        tickets.insert(0, ticket(key, session_id, step_id, step_start, step_positions, chain_digest(tickets)))
    return tickets


def check_ticket(key: bytes, session_id: str, step: pb.Step, positions: int, last: tuple[int, int] | None) -> None:
    """Raises ``TicketError`` unless ``step`` (a push of ``positions`` positions into ``session_id``)
    carries a valid ticket under ``key`` and stays inside the step that ticket names.

    ``last``: (step id, end) of the last push taken; a push that opens a new step must start at the
    ticket's start (a later chunk of the step continues it, which ``check_continues`` enforces).
    """
    if len(step.tickets) > MAX_TICKETS:
        raise TicketError(f"a step carries at most {MAX_TICKETS} tickets")
    if any(len(entry.tag) != TAG_BYTES or len(entry.session_id) > 64 for entry in step.tickets):
        raise TicketError(f"a ticket is one session id of at most 64 characters and a {TAG_BYTES}-byte tag")
    mine = [index for index, entry in enumerate(step.tickets) if entry.session_id == session_id]
    if len(mine) != 1:
        raise TicketError("the push carries no ticket of this session's client" if not mine else
                          "the push carries several tickets for this session")
    entry = step.tickets[mine[0]]
    whole = step.step_positions or positions
    expected = ticket_tag(key, session_id, step.step_id, entry.step_start, whole,
                          chain_digest(step.tickets[mine[0] + 1 :]))
    if not hmac.compare_digest(expected, entry.tag):
        raise TicketError(f"the push's ticket for step {step.step_id} is not this session's client's")
    opens_step = last is None or step.step_id != last[0]
    if opens_step and step.start_position != entry.step_start:
        raise TicketError(f"step {step.step_id} begins at {entry.step_start}, not at {step.start_position}")
    if not entry.step_start <= step.start_position or step.start_position + positions > entry.step_start + whole:
        raise TicketError(f"the push's positions lie outside step {step.step_id}")
