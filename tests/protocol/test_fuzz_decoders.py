"""Every decoder of remote input, fuzzed: no crash, no hang, only the exception types it documents.

hypothesis, bounded in time for CI (``BRIGADE_FUZZ_EXAMPLES`` raises the example count for a longer
local run). The coverage-guided counterpart is ``tests/fuzz/atheris_decoders.py``.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from brigade_fuzz import (
    Honest,
    dht_records,
    forward_requests,
    honest_index,
    honest_peer,
    inference_requests,
    json_values,
    raw_bytes_or,
    sign_fields,
    wire_tensors,
)
from google.protobuf.message import DecodeError
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import InvalidTensorError
from brigade.protocol.identity import Identity
from brigade.protocol.records import (
    MAX_RECORD_BYTES,
    IndexEntry,
    PeerRecord,
    RecordError,
    check_signed,
    parse_address,
    parse_signed,
)
from brigade.protocol.tensors import TensorLimits, decode
from brigade.routing.validator import RecordValidator

pytestmark = pytest.mark.timeout(120)

EXAMPLES = int(os.environ.get("BRIGADE_FUZZ_EXAMPLES", "250"))
fuzz = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SMALL = TensorLimits(max_bytes=4096, max_rank=3, max_dim=1024)
IDENTITY = Identity.generate()


def honest(rng: random.Random) -> Honest:
    now = get_dht_time()
    return honest_peer(IDENTITY, now, rng) if rng.random() < 0.7 else honest_index(IDENTITY, now)


def check_tensor(message: pb.Tensor, limits: TensorLimits) -> None:
    """decode either refuses with InvalidTensorError or returns exactly what the message describes."""
    try:
        tensor = decode(message, limits)
    except InvalidTensorError:
        return
    assert tuple(tensor.shape) == tuple(message.shape)
    assert tensor.numel() * tensor.element_size() == len(message.data) <= limits.max_bytes
    assert not limits.check_finite or bool(torch.isfinite(tensor).all())


@fuzz
@given(message=wire_tensors(), tight=st.booleans())
def test_tensor_decode(message: pb.Tensor, tight: bool) -> None:
    check_tensor(message, SMALL if tight else TensorLimits())


@fuzz
@given(data=raw_bytes_or(inference_requests()))
def test_inference_request_from_bytes(data: bytes) -> None:
    try:
        request = pb.InferenceRequest.FromString(data)
    except DecodeError:
        return
    if request.WhichOneof("kind") == "step":
        check_tensor(request.step.hidden, SMALL)
    elif request.WhichOneof("kind") == "open":
        assert len(request.open.pad_lengths) <= len(data)


@fuzz
@given(data=raw_bytes_or(forward_requests()))
def test_forward_request_from_bytes(data: bytes) -> None:
    try:
        request = pb.ForwardRequest.FromString(data)
    except DecodeError:
        return
    check_tensor(request.hidden, SMALL)


@fuzz
@given(data=st.binary(max_size=512))
def test_tensor_from_bytes(data: bytes) -> None:
    try:
        message = pb.Tensor.FromString(data)
    except DecodeError:
        return
    check_tensor(message, SMALL)


def check_record(value: Any, expected_peer_id: str | None = None) -> None:
    """check_signed raises only RecordError; whatever it accepts meets every record invariant."""
    for schema in (PeerRecord, IndexEntry):
        try:
            record = check_signed(value, schema, expected_peer_id)
        except RecordError:
            assert parse_signed(value, schema, expected_peer_id) is None
            continue
        assert record.signed_at < record.expires_at
        if isinstance(record, PeerRecord):
            assert 0 <= record.start_layer < record.end_layer <= record.num_layers
            assert parse_address(record.address) is not None
            assert len(record.pings) <= 8


@fuzz
@given(value=json_values() | st.fixed_dictionaries({"fields": json_values(), "signature": st.text(max_size=140)}))
def test_check_signed_on_anything(value: Any) -> None:
    check_record(value)


@fuzz
@given(data=st.data())
def test_check_signed_on_signed_records_with_one_field_replaced(data: st.DataObject) -> None:
    target = honest(data.draw(st.randoms(use_true_random=False)))
    name = data.draw(st.sampled_from([*sorted(target.fields), "unknown_field"]))
    fields = {**target.fields, name: data.draw(json_values(10))}
    try:
        value = sign_fields(fields, IDENTITY)
    except (TypeError, ValueError):  # not JSON at all: the canonical form fails before any signature
        value = {"fields": fields, "signature": target.value["signature"]}
    check_record(value, IDENTITY.peer_id)


@fuzz
@given(record=dht_records(honest), check_clock=st.booleans())
def test_validator_on_anything(record, check_clock: bool) -> None:
    """rejection never raises; what it accepts, a reader's own checks accept too (else a node
    could hold records that make every reader drop its whole answer)."""
    reason = RecordValidator(check_clock=check_clock).rejection(record, get_dht_time())
    assert reason is None or isinstance(reason, str)
    if reason is None:
        value = MSGPackSerializer.loads(record.value)
        subkey = MSGPackSerializer.loads(record.subkey)
        assert len(record.value) < MAX_RECORD_BYTES + 1024
        assert parse_signed(value, PeerRecord, subkey) or parse_signed(value, IndexEntry, subkey)


_PEM_HEADERS = [b"-----BEGIN PRIVATE KEY-----\n", b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n",
                b"-----BEGIN OPENSSH PRIVATE KEY-----\n", b"-----BEGIN EC PRIVATE KEY-----\n"]


@st.composite
def key_files(draw: st.DrawFn) -> bytes:
    """Junk, or junk framed as PEM (base64 or not) so that the parser goes past the framing."""
    body = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        return body
    import base64

    text = base64.encodebytes(body) if draw(st.booleans()) else body
    header = draw(st.sampled_from(_PEM_HEADERS))
    return header + text + header.replace(b"BEGIN", b"END")


@fuzz
@given(content=key_files())
def test_identity_from_a_file_of_junk(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "peer.key"
        path.write_bytes(content)
        try:
            Identity.load_or_create(path)
        except ValueError as e:
            assert str(path) in str(e)


def test_identity_from_an_encrypted_broken_or_huge_key_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    ))
    with pytest.raises(ValueError, match="unencrypted PEM"):
        Identity.load_or_create(encrypted)
    # An Ed25519 key file whose algorithm id was mutated to X448: OpenSSL fails inside (atheris found it).
    x448_header = tmp_path / "x448.key"
    x448_header.write_text("-----BEGIN PRIVATE KEY-----\n"
                           "MC4CAQAwBQYDK2VvBCIEIJBD86Uk8bJ/hwAeqYOIml5cCgRIBIxT2s4LE1oA8iX6\n"
                           "-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="unencrypted PEM"):
        Identity.load_or_create(x448_header)
    huge = tmp_path / "huge.key"
    huge.write_bytes(b"-" * (1 << 20))
    with pytest.raises(ValueError, match="not a key file"):
        Identity.load_or_create(huge)
