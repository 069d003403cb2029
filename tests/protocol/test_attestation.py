"""Attestation checks: what a remembered verdict (protocol/attestation.py) and the remembered keys
(protocol/identity.py) must never change."""

from __future__ import annotations

import pytest

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import attest, check_attestation
from brigade.protocol.identity import Identity, peer_id_of, verify


def _attestation(identity: Identity, step_id: int = 7) -> pb.Attestation:
    return attest(identity, "session-0001", step_id, 12, (0, 8), b"i" * 32, b"o" * 32)


def test_a_checked_attestation_checks_again_and_no_altered_copy_passes_after_it() -> None:
    identity = Identity.generate()
    att = _attestation(identity)
    assert check_attestation(att, identity.public_key)
    assert check_attestation(att, identity.public_key)  # the remembered verdict
    for field, value in [("step_id", 8), ("start_position", 13), ("end_layer", 9), ("session_id", "session-0002"),
                         ("output_sha256", b"x" * 32), ("input_sha256", b"x" * 32), ("rope_sha256", b"r" * 32)]:
        altered = pb.Attestation()
        altered.CopyFrom(att)
        setattr(altered, field, value)
        assert not check_attestation(altered, identity.public_key), field
    forged = pb.Attestation()
    forged.CopyFrom(att)
    forged.signature = bytes([att.signature[0] ^ 1]) + att.signature[1:]
    assert not check_attestation(forged, identity.public_key)
    assert check_attestation(att, identity.public_key)


def test_an_attestation_checks_only_against_its_own_signers_key() -> None:
    signer, other = Identity.generate(), Identity.generate()
    att = _attestation(signer)
    assert check_attestation(att, signer.public_key)
    assert not check_attestation(att, other.public_key)  # another key: another peer id
    assert not check_attestation(att, other.public_key)
    renamed = pb.Attestation()
    renamed.CopyFrom(att)
    renamed.peer_id = other.peer_id
    assert not check_attestation(renamed, other.public_key)  # its id, but not its signature


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_other_bytes_likes_are_not_mistaken_for_a_remembered_key(wrap: type) -> None:
    identity = Identity.generate()
    message = b"brigade"
    signature = identity.sign(message)
    assert verify(identity.public_key, signature, message)  # remembered for these exact bytes
    assert check_attestation(_attestation(identity), identity.public_key)
    key = wrap(identity.public_key)
    assert peer_id_of(key) == identity.peer_id
    with pytest.raises(TypeError):  # as before: the key must be bytes, remembered or not
        verify(key, signature, message)
    with pytest.raises(TypeError):
        check_attestation(_attestation(identity), key)


def test_a_malformed_key_fails_every_time() -> None:
    message = b"brigade"
    signature = Identity.generate().sign(message)
    for _ in range(2):
        assert not verify(b"short", signature, message)
        assert not verify(b"", signature, message)
    with pytest.raises(TypeError):
        peer_id_of(None)  # type: ignore[arg-type]
