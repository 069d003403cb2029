"""What a peer checks of a push before computing it and vouching for it (``peer/pushes.py``).

The real-process cases (an upstream pushing other bytes than it signs, with or without a matching
attestation; a receiver signing another input) are in ``tests/client/test_verify_dodges.py``.
"""

from __future__ import annotations

import pytest
import torch

from brigade.peer.pushes import check_continues, vouched_push
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import attest, tensor_digest
from brigade.protocol.errors import InvalidRequestError
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode


def _push(identity: Identity, step_id: int = 5, position: int = 10, layers: tuple[int, int] = (0, 3)) -> pb.Step:
    hidden = encode(torch.ones(1, 2, 4))
    step = pb.Step(hidden=hidden, start_position=position, step_id=step_id)
    step.pushed_by.CopyFrom(attest(identity, "upstream-session", step_id, position, layers, b"i" * 32,
                                   tensor_digest(hidden)))
    return step


def test_a_push_is_vouched_for_only_with_its_pushers_signature_over_exactly_its_bytes() -> None:
    pusher, other = Identity.generate(), Identity.generate()
    key = pusher.public_key
    assert vouched_push(_push(pusher), pusher.peer_id, key, 3) is not None
    assert vouched_push(_push(pusher), pusher.peer_id, key, 4) is None  # not the layers just before ours
    assert vouched_push(_push(other), pusher.peer_id, key, 3) is None  # another peer's attestation
    changed = _push(pusher)
    changed.hidden.CopyFrom(encode(torch.zeros(1, 2, 4)))
    assert vouched_push(changed, pusher.peer_id, key, 3) is None  # other bytes than it signed
    moved = _push(pusher)
    moved.start_position = 11
    assert vouched_push(moved, pusher.peer_id, key, 3) is None
    renumbered = _push(pusher)
    renumbered.step_id = 6
    assert vouched_push(renumbered, pusher.peer_id, key, 3) is None
    forged = _push(pusher)
    forged.pushed_by.signature = bytes(64)
    assert vouched_push(forged, pusher.peer_id, key, 3) is None
    bare = pb.Step(hidden=encode(torch.ones(1, 2, 4)), start_position=10, step_id=5)
    assert vouched_push(bare, pusher.peer_id, key, 3) is None
    assert vouched_push(_push(pusher), pusher.peer_id, key, 3, digest=bytes(32)) is None  # a digest handed in counts


def test_pushes_continue_their_step_or_start_a_newer_one() -> None:
    def step(step_id: int, position: int) -> pb.Step:
        return pb.Step(start_position=position, step_id=step_id)

    last = check_continues(None, step(3, 0), 128)
    last = check_continues(last, step(3, 128), 128)  # the next chunk of the same step
    assert last == (3, 256)
    assert check_continues(last, step(4, 200), 1) == (4, 201)  # a newer step (a retry, a rollback) may rewind
    for repeat in (step(3, 128), step(3, 0), step(2, 256), step(3, 300)):  # repeats, rewinds, gaps, older steps
        with pytest.raises(InvalidRequestError, match="must continue"):
            check_continues(last, repeat, 1)


def test_whatever_is_wrong_with_a_push_is_refused_as_the_pushers_not_posted_to_the_session() -> None:
    """``take_push`` raises PERMISSION_DENIED, which ends only the push stream (``peer/servicer.py``
    ``_serve_push`` calls it outside the block that posts errors to the client's session): nothing a
    pusher sends can end its honest receiver's session and get the receiver banned."""
    from types import SimpleNamespace

    from brigade.peer.outbox import Outbox
    from brigade.peer.pushes import take_push
    from brigade.protocol.errors import PermissionDeniedError
    from brigade.protocol.tensors import TensorLimits
    from brigade.protocol.tickets import new_push_key, ticket

    key = new_push_key()

    def session() -> SimpleNamespace:
        return SimpleNamespace(push_key=key, session_id="receiver-session", last_push=None, batch_size=1,
                               max_length=64, push_refusals_told=0, outbox=Outbox(), release=None, closed=False)

    def push(step_id: int = 1, start: int = 0, positions: int = 2, width: int = 4, **changes: list) -> pb.Step:
        step = pb.Step(hidden=encode(torch.ones(1, positions, width)), start_position=start, step_id=step_id,
                       step_positions=positions)
        step.tickets.append(ticket(key, "receiver-session", step_id, start, positions))
        step.rope_lengths.extend(changes.get("rope_lengths", []))
        return step

    fine = session()
    assert take_push(fine, push(), TensorLimits(), 4).positions == 2 and fine.last_push == (1, 2)
    foreign = push()  # another hop's ticket, malformed, before the receiver's own (outside what its tag covers)
    foreign.tickets.insert(0, pb.PushTicket(session_id="x" * 65, tag=bytes(32)))
    made_up = push(step_id=2)
    made_up.step_id = 3  # under step 2's ticket
    for bad in (push(width=5), push(rope_lengths=[1, 99]), foreign, made_up, push(positions=65)):
        with pytest.raises(PermissionDeniedError, match="push refused"):
            take_push(session(), bad, TensorLimits(), 4)
    rewound = session()
    take_push(rewound, push(step_id=3, start=4), TensorLimits(), 4)
    with pytest.raises(PermissionDeniedError, match="must continue"):
        take_push(rewound, push(step_id=2, start=0), TensorLimits(), 4)  # an older step: stale ticket
    assert rewound.last_push == (3, 6)
    told = rewound.outbox._items[0][0]  # the refusal is told to the client (which unlinks the pair at once)
    assert told.WhichOneof("kind") == "push_refused" and told.push_refused.step_id == 2
    for _ in range(10):  # a pusher that re-attaches to refuse again cannot fill the client's stream
        with pytest.raises(PermissionDeniedError):
            take_push(rewound, push(step_id=1), TensorLimits(), 4)
    assert len(rewound.outbox) == 4 and not rewound.closed
