"""What a peer signs about each result: the evidence behind a report of wrong work.

For every step a peer computes it signs the session, step, first position, layers, and the
SHA-256 of the input it received and of the output it produced, both over the exact wire bytes.
Consecutive hops then chain: hop i's output hash is hop i+1's input hash, so a peer that forwards
one thing and reports another is caught by its neighbour's signature, and a result that a
re-check shows to be wrong is bound to the peer that signed it.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.identity import Identity, peer_id_of, verify

_DOMAIN = b"brigade-attestation/1"
# Signature verdicts remembered, by (key, signature, signed bytes): an attestation checked on arrival
# is checked again wherever it is used as evidence later (a handover's echo, a result check's chain,
# a re-run), and Ed25519 verification is deterministic, so the second check is a lookup.
VERDICT_CACHE_SIZE = 4096


def tensor_digest(tensor: pb.Tensor) -> bytes:
    """SHA-256 over a wire tensor's dtype, shape and bytes (what both ends can hash without decoding)."""
    digest = hashlib.sha256()
    digest.update(tensor.dtype.encode())
    digest.update(struct.pack(f"!{len(tensor.shape)}q", *tensor.shape))
    digest.update(tensor.data)
    return digest.digest()


def rope_digest(lengths: Sequence[int]) -> bytes:
    """SHA-256 of positions' call lengths (``Step.rope_lengths``); b"" for none, as models that ignore them send."""
    if not lengths:
        return b""
    return hashlib.sha256(struct.pack(f"!{len(lengths)}I", *lengths)).digest()


def _signed_bytes(att: pb.Attestation) -> bytes:
    fields = [
        _DOMAIN, att.peer_id.encode(), att.session_id.encode(),
        struct.pack("!QIII", att.step_id, att.start_position, att.start_layer, att.end_layer),
        att.input_sha256, att.output_sha256,
    ]
    if att.rope_sha256:  # only length-dependent ropes have one: other attestations sign what they always did
        fields.append(att.rope_sha256)
    return b"\0".join(fields)


def attest(identity: Identity, session_id: str, step_id: int, start_position: int, layers: tuple[int, int],
           input_sha256: bytes, output_sha256: bytes, rope_sha256: bytes = b"") -> pb.Attestation:
    """Signed evidence of one result; ``rope_sha256`` binds the call lengths it was computed with, so a
    peer that forwards wrong ones (or computes with them) is seen by the client on arrival."""
    att = pb.Attestation(peer_id=identity.peer_id, session_id=session_id, step_id=step_id,
                         start_position=start_position, start_layer=layers[0], end_layer=layers[1],
                         input_sha256=input_sha256, output_sha256=output_sha256, rope_sha256=rope_sha256)
    att.signature = identity.sign(_signed_bytes(att))
    return att


def check_attestation(att: pb.Attestation, public_key: bytes) -> bool:
    """True when ``att`` is signed by ``public_key`` and names that key's peer id."""
    if peer_id_of(public_key) != att.peer_id:
        return False
    if type(public_key) is bytes:  # hashable: the verdict is remembered
        return _remembered_verdict(public_key, att.signature, _signed_bytes(att))
    return verify(public_key, att.signature, _signed_bytes(att))


_remembered_verdict = functools.lru_cache(maxsize=VERDICT_CACHE_SIZE)(verify)
