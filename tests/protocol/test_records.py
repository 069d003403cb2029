"""Signed records: honest ones parse, tampered or forged ones are dropped, unknown fields are tolerated."""

from __future__ import annotations

import copy

from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, parse_signed_record, sign_record


def make_record(identity: Identity, **overrides: object) -> PeerRecord:
    fields = dict(
        peer_id=identity.peer_id, public_key=identity.public_key.hex(), address="127.0.0.1:5000",
        model_name="tiny", start_layer=0, end_layer=4, num_layers=8, dtype="float32", signed_at=100.0, expires_at=130.0,
    )
    return PeerRecord(**{**fields, **overrides})


def test_honest_record_parses() -> None:
    identity = Identity.generate()
    record = make_record(identity)
    assert parse_signed_record(sign_record(record, identity), identity.peer_id) == record


def test_tampered_forged_and_malformed_records_are_dropped() -> None:
    owner, forger = Identity.generate(), Identity.generate()
    value = sign_record(make_record(owner), owner)

    tampered = copy.deepcopy(value)
    tampered["fields"]["end_layer"] = 8
    assert parse_signed_record(tampered) is None

    flipped = copy.deepcopy(value)
    flipped["signature"] = ("0" if value["signature"][0] != "0" else "1") + value["signature"][1:]
    assert parse_signed_record(flipped) is None

    # The forger signs a record naming the owner's id with its own key: the id does not derive from it.
    forged = {"fields": {**value["fields"], "public_key": forger.public_key.hex()}, "signature": ""}
    forged["signature"] = forger.sign(b"anything").hex()
    assert parse_signed_record(forged) is None
    assert parse_signed_record(value, expected_peer_id=forger.peer_id) is None

    for junk in (None, 1, "x", {"fields": "x"}, {"fields": {}, "signature": 3}):
        assert parse_signed_record(junk) is None
    backwards = sign_record(make_record(owner, start_layer=4, end_layer=4), owner)
    assert parse_signed_record(backwards) is None


def test_unknown_fields_from_newer_peers_are_tolerated() -> None:
    identity = Identity.generate()
    fields = {**make_record(identity).model_dump(), "relay": "somewhere", "future_metric": 3.5}
    import json

    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    value = {"fields": fields, "signature": identity.sign(canonical).hex()}
    record = parse_signed_record(value)
    assert record is not None and record.peer_id == identity.peer_id


def test_identity_file_keeps_the_peer_id(tmp_path) -> None:
    path = tmp_path / "keys" / "peer.key"
    first = Identity.load_or_create(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id
