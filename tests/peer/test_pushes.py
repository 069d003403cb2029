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
