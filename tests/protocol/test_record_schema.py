"""The hardened record schemas: bounded, finite, well-formed on the wire; lax for records built in code."""

from __future__ import annotations

import math
import random

import pytest
from brigade_fuzz import honest_index, honest_peer, sign_fields
from pydantic import ValidationError

from brigade.protocol.identity import Identity
from brigade.protocol.records import (
    MAX_RECORD_TTL_S,
    IndexEntry,
    PeerRecord,
    RecordError,
    check_signed,
    model_key,
    parse_address,
    parse_signed,
    sign,
)

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate()


def test_honest_records_of_every_shape_round_trip(identity: Identity) -> None:
    rng = random.Random(3)
    for _ in range(200):
        honest = honest_peer(identity, NOW, rng)
        record = check_signed(honest.value, PeerRecord, identity.peer_id)
        known = {name: value for name, value in honest.fields.items() if name in PeerRecord.model_fields}
        assert record.model_dump() == known  # unknown (newer) fields dropped, known ones kept exactly
    entry = honest_index(identity, NOW)
    assert check_signed(entry.value, IndexEntry, identity.peer_id).model_name == entry.fields["model_name"]


def test_sign_matches_the_fuzz_signer(identity: Identity) -> None:
    """brigade_fuzz.sign_fields must sign what records.sign signs, or its attacks test the wrong thing."""
    record = PeerRecord(peer_id=identity.peer_id, public_key=identity.public_key.hex(), address="127.0.0.1:1",
                        model_name="m", start_layer=0, end_layer=1, num_layers=1, dtype="float32",
                        signed_at=NOW, expires_at=NOW + 20)
    assert sign(record, identity) == sign_fields(record.model_dump(), identity)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"start_layer": "0"}, "schema: start_layer"),
        ({"start_layer": True}, "schema: start_layer"),
        ({"end_layer": 4.0}, "schema: end_layer"),
        ({"throughput": "fast"}, "schema: throughput"),
        ({"throughput": math.inf}, "not plain JSON"),
        ({"throughput": 1e300}, "schema: throughput"),
        ({"reachable": 1}, "schema: reachable"),
        ({"state": "gone"}, "schema: state"),
        ({"pings": {f"bp{i}": 1.0 for i in range(9)}}, "schema: pings"),
        ({"address": "::1:5000"}, "address"),
        ({"address": "1.2.3.4:70000"}, "address"),
        ({"dtype": "float32\n"}, "dtype"),
        ({"model_name": "tiny\n"}, "model_name"),
        ({"tls_spki_sha256": "AB" * 32}, "tls_spki_sha256"),
        ({"tls_cert": "c" * 5000}, "schema: tls_cert"),
        ({"relay_peer_id": "0OIl"}, "relay_peer_id"),
        ({"software_version": "tab\there"}, "printable"),
        ({"expires_at": NOW + MAX_RECORD_TTL_S + 1}, "lives 61 s"),
        ({"expires_at": NOW - 1}, "expires before"),
        ({"end_layer": 9}, "within num_layers"),
        ({"padding": "p" * 7000}, "over the 6144-byte limit"),
    ],
)
def test_signed_but_malformed_records_say_why(identity: Identity, change: dict, reason: str) -> None:
    fields = {**honest_peer(identity, NOW).fields, **change}
    with pytest.raises(RecordError, match=reason.replace("[", r"\[")):
        check_signed(sign_fields(fields, identity), PeerRecord, identity.peer_id)
    assert parse_signed(sign_fields(fields, identity), PeerRecord) is None


def test_index_entries_are_checked_too(identity: Identity) -> None:
    fields = honest_index(identity, NOW).fields
    for change in ({"model_name": "../x"}, {"model_name": 3}, {"expires_at": NOW + 3600}):
        with pytest.raises(RecordError):
            check_signed(sign_fields({**fields, **change}, identity), IndexEntry)


def test_records_built_in_code_stay_lax_about_formats() -> None:
    """Route and span tests build made-up peers; only the bounds any record meets apply to them."""
    PeerRecord(peer_id="bp0-0-8", public_key="00", address="peer-a:1", model_name="m", start_layer=0,
               end_layer=8, num_layers=16, dtype="float32", signed_at=0.0)
    with pytest.raises(ValidationError):
        PeerRecord(peer_id="bp0", public_key="00", address="a:1", model_name="m", start_layer=0, end_layer=8,
                   num_layers=16, dtype="float32", signed_at=0.0, throughput=math.nan)
    with pytest.raises(ValidationError):
        PeerRecord(peer_id="bp0", public_key="00", address="a:1", model_name="m", start_layer=0, end_layer=8,
                   num_layers=16, dtype="float32", signed_at=0.0, pings={f"p{i}": 1.0 for i in range(9)})


def test_sign_refuses_a_record_that_lives_too_long(identity: Identity) -> None:
    record = PeerRecord(peer_id=identity.peer_id, public_key=identity.public_key.hex(), address="127.0.0.1:1",
                        model_name="m", start_layer=0, end_layer=1, num_layers=1, dtype="float32",
                        signed_at=NOW, expires_at=NOW + MAX_RECORD_TTL_S + 1)
    with pytest.raises(ValueError, match="at most 60 s"):
        sign(record, identity)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("[::1]:443", ("::1", 443)),
        ("[2001:db8::1]:8080", ("2001:db8::1", 8080)),
        ("peer-3.example.org:1", ("peer-3.example.org", 1)),
        ("localhost.:65535", ("localhost.", 65535)),
        ("::1:5000", None),
        ("127.0.0.1", None),
        ("127.0.0.1:0", None),
        ("127.0.0.1:65536", None),
        ("127.0.0.1:+80", None),
        ("127.0.0.1:８０", None),
        ("[::1:80", None),
        ("[notip]:80", None),
        (":80", None),
        ("-a.org:80", None),
        ("a..org:80", None),
        ("a b:80", None),
        ("a\n:80", None),
        ("a" * 64 + ".org:80", None),
    ],
)
def test_parse_address(address: str, parsed: tuple[str, int] | None) -> None:
    assert parse_address(address) == parsed


def test_model_key_refuses_a_trailing_newline() -> None:
    with pytest.raises(ValueError):
        model_key("tiny\n")
