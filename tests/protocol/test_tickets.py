"""Push tickets (``protocol/tickets.py``): a receiving peer computes a push only under its client's ticket."""

from __future__ import annotations

import pytest
import torch

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.tensors import encode
from brigade.protocol.tickets import MAX_TICKETS, TicketError, check_ticket, new_push_key, run_tickets, ticket

SESSION = "receiver-session"


def _push(key: bytes, step_id: int = 7, start: int = 10, positions: int = 4, chunk_start: int | None = None,
          chunk: int | None = None) -> pb.Step:
    """A chunk [chunk_start, chunk_start + chunk) of step ``step_id`` = [start, start + positions), ticketed."""
    chunk_start = start if chunk_start is None else chunk_start
    chunk = positions if chunk is None else chunk
    step = pb.Step(hidden=encode(torch.ones(1, chunk, 4)), start_position=chunk_start, step_id=step_id,
                   step_positions=positions)
    step.tickets.append(ticket(key, "another-session", step_id, start, positions))  # a later hop's, ignored
    step.tickets.append(ticket(key, SESSION, step_id, start, positions))
    return step


def test_a_push_needs_its_clients_ticket_for_exactly_its_step() -> None:
    key = new_push_key()
    check_ticket(key, SESSION, _push(key), 4, None)
    check_ticket(key, SESSION, _push(key, chunk_start=12, chunk=2), 2, (7, 12))  # a later chunk of the step
    with pytest.raises(TicketError, match="not this session's client's"):
        check_ticket(new_push_key(), SESSION, _push(key), 4, None)  # another client's (or made-up) key
    made_up = _push(key)
    made_up.step_id = 8  # a newer step id under the ticket of step 7
    with pytest.raises(TicketError, match="not this session's client's"):
        check_ticket(key, SESSION, made_up, 4, (7, 14))
    longer = _push(key)
    longer.step_positions = 5  # the ticket binds the step's length too
    with pytest.raises(TicketError, match="not this session's client's"):
        check_ticket(key, SESSION, longer, 4, None)
    with pytest.raises(TicketError, match="begins at 10"):  # a new step must start where its ticket says
        check_ticket(key, SESSION, _push(key, chunk_start=12, chunk=2), 2, (6, 30))
    with pytest.raises(TicketError, match="outside step 7"):  # a chunk past the step's end
        check_ticket(key, SESSION, _push(key, chunk_start=12, chunk=4), 4, (7, 12))
    bare = pb.Step(hidden=encode(torch.ones(1, 4, 4)), start_position=10, step_id=7)
    with pytest.raises(TicketError, match="no ticket"):
        check_ticket(key, SESSION, bare, 4, None)
    twice = _push(key)
    twice.tickets.append(ticket(key, SESSION, 7, 10, 4))
    with pytest.raises(TicketError, match="several tickets"):
        check_ticket(key, SESSION, twice, 4, None)
    flood = _push(key)
    flood.tickets.extend(ticket(key, f"s{index}", 7, 10, 4) for index in range(MAX_TICKETS))
    with pytest.raises(TicketError, match="at most"):
        check_ticket(key, SESSION, flood, 4, None)


def test_a_hop_cannot_strip_or_alter_a_later_hops_ticket_without_its_own_next_hop_refusing() -> None:
    """Three receivers B, C, D of one run: each tag covers the tickets after it (``run_tickets``)."""
    keys = {name: new_push_key() for name in ("session-b", "session-c", "session-d")}

    def step_with(tickets: list[pb.PushTicket]) -> pb.Step:
        return pb.Step(hidden=encode(torch.ones(1, 4, 4)), start_position=10, step_id=7, step_positions=4,
                       tickets=tickets)

    tickets = run_tickets([(key, name) for name, key in keys.items()], 7, 10, 4)
    for name, key in keys.items():  # each receiver of the untouched step takes it
        check_ticket(key, name, step_with(tickets), 4, None)
    stripped = [tickets[0], tickets[1]]  # the first hop drops D's ticket
    with pytest.raises(TicketError, match="not this session's client's"):
        check_ticket(keys["session-b"], "session-b", step_with(stripped), 4, None)  # B refuses the first hop
    altered = [tickets[0], tickets[1], pb.PushTicket(session_id="session-d", step_start=10, tag=bytes(32))]
    with pytest.raises(TicketError, match="not this session's client's"):
        check_ticket(keys["session-b"], "session-b", step_with(altered), 4, None)
    with pytest.raises(TicketError, match="not this session's client's"):
        check_ticket(keys["session-c"], "session-c", step_with(altered), 4, None)


def test_ticket_lists_cannot_be_re_split_into_one_that_hashes_alike() -> None:
    """A later ticket split into two (its tag's bytes moved into a second, empty-named ticket) must not
    keep the earlier hop's tag valid: every field of the chain is length-prefixed, and odd tags refused."""
    from brigade.protocol.tickets import chain_digest

    later = pb.PushTicket(session_id="session-c", step_start=10, tag=bytes(range(32)))
    split = [pb.PushTicket(session_id="session-c", step_start=10, tag=later.tag[:4]),
             pb.PushTicket(session_id="", step_start=int.from_bytes(later.tag[6:10], "big"), tag=later.tag[10:])]
    assert chain_digest([later]) != chain_digest(split)
    key = new_push_key()
    step = pb.Step(hidden=encode(torch.ones(1, 4, 4)), start_position=10, step_id=7, step_positions=4,
                   tickets=[ticket(key, SESSION, 7, 10, 4, chain_digest(split)), *split])
    with pytest.raises(TicketError, match="32-byte tag"):
        check_ticket(key, SESSION, step, 4, None)
