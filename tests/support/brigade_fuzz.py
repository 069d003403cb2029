"""Fuzzing material for brigade's decoders: honest records, a seeded record mutator, and hypothesis
strategies for wire messages and DHT values.

Two kinds of generator, for two jobs:

- ``RecordMutator`` (seeded ``random.Random``): thousands of targeted attacks per second, each
  labelled with its kind (forged subkey, flipped signature, expiry too far, wrong types, ...). Most
  attacks are validly signed, so that the check under test, not the signature, has to catch them.
  The record tests count its verdicts; the atheris script drives it from fuzzer bytes.
- hypothesis strategies (``wire_tensors``, ``inference_requests``, ``forward_requests``,
  ``mutated_bytes``, ``json_values``, ``dht_records``): shrinking, property-style inputs for "no
  crash, no hang, no unexpected exception type" tests of every decoder, and of the servicer later.

Records go to the validator serialized exactly as hivemind carries them (``dht_record``).
"""

from __future__ import annotations

import base64
import json
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hypothesis import strategies as st

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.identity import Identity
from brigade.protocol.records import (
    MAX_RECORD_BYTES,
    MAX_RECORD_TTL_S,
    MODELS_INDEX_KEY,
    IndexEntry,
    PeerRecord,
    model_key,
)
from brigade.routing.validator import MAX_CLOCK_SKEW_S, MAX_VALUE_BYTES

FUZZ_MODEL = "fuzz/model"
HONEST_TTL_S = 20.0  # what peers use today
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


# ---------------------------------------------------------------------------------------- honest
def sign_fields(fields: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """A DHT value signing ``fields`` exactly as given: what a misbehaving peer's own code would do.

    Same canonical form as ``protocol.records`` (kept in step by the honest-record tests), except
    that NaN and infinities are written too, so that such records fail on their content, not here.
    """
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return {"fields": fields, "signature": identity.sign(canonical).hex()}


def dht_record(key: str | bytes, subkey: Any, value: Any, expiration: float) -> DHTRecord:
    """``value`` stored under ``key``/``subkey`` as a validator receives it (``subkey=None``: a plain value)."""
    key_bytes = key if isinstance(key, bytes) else DHTID.generate(source=key).to_bytes()
    subkey_bytes = DHTProtocol.IS_REGULAR_VALUE if subkey is None else MSGPackSerializer.dumps(subkey)
    value_bytes = value if isinstance(value, bytes) else MSGPackSerializer.dumps(value)
    return DHTRecord(key_bytes, subkey_bytes, value_bytes, expiration)


def random_peer_id(rng: random.Random) -> str:
    return "bp" + "".join(rng.choice(_B58) for _ in range(22))


def fake_pem(rng: random.Random, body_bytes: int = 800) -> str:
    """Certificate-shaped PEM text (the validator checks its size and alphabet, not its content)."""
    body = base64.b64encode(rng.randbytes(body_bytes)).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def honest_peer_fields(
    identity: Identity, now: float, rng: random.Random | None = None, *, model: str = FUZZ_MODEL,
    signed_at: float | None = None, ttl_s: float = HONEST_TTL_S, address: str = "127.0.0.1:5000",
) -> dict[str, Any]:
    """A PeerRecord's fields as an honest peer signs them; with ``rng``, every optional field varies
    (addresses of all three forms, pings, certificate, relay, unknown fields of a newer version)."""
    signed_at = now if signed_at is None else signed_at
    record = PeerRecord(
        peer_id=identity.peer_id, public_key=identity.public_key.hex(), address=address,
        model_name=model, start_layer=0, end_layer=4, num_layers=8, dtype="float32",
        signed_at=signed_at, expires_at=signed_at + ttl_s,
    )
    fields = record.model_dump()
    if rng is None:
        return fields
    num_layers = rng.randint(1, 160)
    start = rng.randrange(num_layers)
    host = rng.choice(["10.0.0.7", "[2001:db8::1]", "peer-3.example.org", "localhost"])
    fields.update(
        address=f"{host}:{rng.randint(1, 65535)}",
        start_layer=start, end_layer=rng.randint(start + 1, num_layers), num_layers=num_layers,
        dtype=rng.choice(["float32", "bfloat16", "float16"]), quantization=rng.choice(["none", "nf4", "int8"]),
        throughput=rng.uniform(0, 5000), prefill_throughput=rng.uniform(0, 50000),
        free_cache_tokens=rng.randint(0, 1 << 24), state=rng.choice(["online", "leaving"]),
        started_at=signed_at - rng.uniform(0, 1e6), software_version="0.1.0",
        pings={random_peer_id(rng): rng.uniform(0, 500) for _ in range(rng.randint(0, 8))},
        reachable=rng.choice([None, True, False]),
    )
    if rng.random() < 0.5:
        fields.update(tls_cert=fake_pem(rng), tls_spki_sha256=rng.randbytes(32).hex())
    if rng.random() < 0.2:
        fields["relay_peer_id"] = random_peer_id(rng)
    if rng.random() < 0.2:  # a newer version's fields: tolerated, and covered by the signature
        fields["future_metric"] = rng.uniform(0, 1)
        fields["future_flags"] = {"batching": True, "note": "x" * rng.randint(0, 200)}
    return fields


@dataclass(frozen=True)
class Honest:
    """One honest signed record and where it is stored."""

    identity: Identity
    key: str
    fields: dict[str, Any]
    value: dict[str, Any]

    @property
    def expiration(self) -> float:
        return self.fields["expires_at"]

    def dht_record(self) -> DHTRecord:
        return dht_record(self.key, self.identity.peer_id, self.value, self.expiration)


def honest_peer(identity: Identity, now: float, rng: random.Random | None = None, **kwargs: Any) -> Honest:
    fields = honest_peer_fields(identity, now, rng, **kwargs)
    return Honest(identity, model_key(fields["model_name"]), fields, sign_fields(fields, identity))


def honest_index(identity: Identity, now: float, *, model: str = FUZZ_MODEL, signed_at: float | None = None) -> Honest:
    signed_at = now if signed_at is None else signed_at
    fields = IndexEntry(
        peer_id=identity.peer_id, public_key=identity.public_key.hex(), model_name=model,
        signed_at=signed_at, expires_at=signed_at + HONEST_TTL_S,
    ).model_dump()
    return Honest(identity, MODELS_INDEX_KEY, fields, sign_fields(fields, identity))


# -------------------------------------------------------------------------------------- mutations
_WRONG_TYPES: dict[str, list[Any]] = {
    "int": [1.5, "3", True, None, [], {}, "", 2.0],
    "float": ["1.5", True, None, [1.0], {"x": 1}, ""],
    "str": [3, 1.5, True, None, [], {}, ["a"]],
    "state": ["offline", "", 1, None, True, "ONLINE"],
    "bool_or_none": ["true", 1, 0.0, [], "", {}],
    "pings": [[], "x", 3, {"bpX": "fast"}, {"bpX": True}, {"bpX": None}, {"bpX": [1]}],
}
_FIELD_KIND = {
    "start_layer": "int", "end_layer": "int", "num_layers": "int", "free_cache_tokens": "int",
    "throughput": "float", "prefill_throughput": "float", "signed_at": "float", "expires_at": "float",
    "started_at": "float", "peer_id": "str", "public_key": "str", "address": "str", "model_name": "str",
    "dtype": "str", "quantization": "str", "version": "str", "software_version": "str", "tls_cert": "str",
    "tls_spki_sha256": "str", "relay_peer_id": "str", "state": "state", "reachable": "bool_or_none",
    "pings": "pings",
}
_INDEX_FIELDS = ("peer_id", "public_key", "signed_at", "expires_at", "model_name")
_BAD_VALUES: dict[str, list[Any]] = {  # right type, wrong content
    "start_layer": [-1, 1 << 21], "end_layer": [0, -5, 1 << 21], "num_layers": [0, -1],
    "free_cache_tokens": [-1, 1 << 60], "throughput": [-1.0, math.inf, math.nan, 1e300],
    "prefill_throughput": [-0.5, math.inf], "started_at": [-1.0, math.inf, 1e12],
    "address": ["", "nohost", "host:", ":80", "1.2.3.4:0", "1.2.3.4:99999", "[::1", "::1:5000", "a b:1",
                "-bad-.org:1", "x" * 300 + ":1", "1.2.3.4:８０", "h\x00st:1", "[zz::1]:5"],
    "model_name": ["", "../etc/passwd", "a" * 200, "has space", "-lead"],
    "dtype": ["", "float 32", "x" * 40, "f\n"], "quantization": ["", "n/f4", "q" * 33],
    "version": ["\x07bell", "x" * 65], "software_version": ["tab\there", "é"],
    "tls_spki_sha256": ["zz" * 32, "AB" * 32, "00"], "tls_cert": ["\x00" * 10, "é" * 10, "c" * 5000],
    "relay_peer_id": ["not an id!", "0OIl", "x" * 80],
    "pings": [{"bad key": 1.0}, {f"bp{i}": 1.0 for i in range(9)}, {"bpX": -1.0}, {"bpX": math.nan}],
    "reachable": [],
}


class RecordMutator:
    """Turns honest records into attacks that a DHT node must refuse, each kind on its own check.

    ``now`` is the DHT time the validator will be asked at; every attack is built around it.
    """

    KINDS = (
        "forged_subkey", "flipped_signature", "tampered_field", "forged_key", "expiry_too_far",
        "lifetime_too_long", "stretched_expiration", "wrong_types", "bad_values", "missing_field",
        "oversized", "wrong_key", "junk_value", "replay", "replay_stretched",
    )

    def __init__(self, rng: random.Random, now: float, attackers: list[Identity]):
        self.rng = rng
        self.now = now
        self.attackers = attackers

    def mutate(self, kind: str, target: Honest, older: Honest | None = None) -> DHTRecord:
        """An attack of ``kind`` on ``target`` (``older``: an earlier record of the same peer, for replays)."""
        return getattr(self, f"_{kind}")(target, older)

    # Each method returns one attack; "re-signed" ones are validly signed by the named identity.
    def _resign(self, target: Honest, fields: dict[str, Any], identity: Identity | None = None) -> dict[str, Any]:
        return sign_fields(fields, identity or target.identity)

    def _forged_subkey(self, target: Honest, _: Honest | None) -> DHTRecord:
        rng = self.rng
        subkey = rng.choice([
            rng.choice(self.attackers).peer_id, random_peer_id(rng), target.identity.peer_id[:-1] + "1",
            target.identity.peer_id + "x", rng.randint(-5, 1 << 40), target.identity.peer_id.encode(), None,
            "x" * rng.randint(100, 400), [target.identity.peer_id], 1.5,
        ])
        if subkey == target.identity.peer_id:  # the one-character change did nothing
            subkey = random_peer_id(rng)
        return dht_record(target.key, subkey, target.value, target.expiration)

    def _flipped_signature(self, target: Honest, _: Honest | None) -> DHTRecord:
        rng = self.rng
        signature = bytearray.fromhex(target.value["signature"])
        choice = rng.random()
        if choice < 0.7:
            signature[rng.randrange(len(signature))] ^= 1 << rng.randrange(8)
            text = signature.hex()
        elif choice < 0.8:
            text = signature.hex()[: rng.randrange(128)]
        elif choice < 0.9:
            text = signature.hex().upper()  # the same bytes, not in the one encoding signers use
        else:
            text = rng.choice(["", "zz" * 64, signature.hex() + "00"])
        return dht_record(target.key, target.identity.peer_id, {**target.value, "signature": text}, target.expiration)

    def _tampered_field(self, target: Honest, _: Honest | None) -> DHTRecord:
        fields = dict(target.fields)
        name = self.rng.choice([name for name in fields if name not in ("peer_id", "public_key")])
        fields[name] = _changed(fields[name], self.rng)
        return dht_record(target.key, target.identity.peer_id, {**target.value, "fields": fields}, target.expiration)

    def _forged_key(self, target: Honest, _: Honest | None) -> DHTRecord:
        attacker = self.rng.choice(self.attackers)
        fields = dict(target.fields)
        if self.rng.random() < 0.5:  # the victim's id with the attacker's key; else the victim's id and key
            fields["public_key"] = attacker.public_key.hex()
        value = sign_fields(fields, attacker)
        return dht_record(target.key, target.identity.peer_id, value, target.expiration)

    def _expiry_too_far(self, target: Honest, _: Honest | None) -> DHTRecord:
        expires_at = self.now + MAX_RECORD_TTL_S + MAX_CLOCK_SKEW_S + self.rng.choice([0.5, 5, 60, 3600, 1e6, 1e9])
        fields = {**target.fields, "expires_at": expires_at, "signed_at": expires_at - HONEST_TTL_S}
        return dht_record(target.key, target.identity.peer_id, self._resign(target, fields), expires_at)

    def _lifetime_too_long(self, target: Honest, _: Honest | None) -> DHTRecord:
        expires_at = self.now + MAX_RECORD_TTL_S + self.rng.uniform(0.01, 25)  # within the clock bound
        fields = {**target.fields, "expires_at": expires_at, "signed_at": self.now}
        return dht_record(target.key, target.identity.peer_id, self._resign(target, fields), expires_at)

    def _stretched_expiration(self, target: Honest, _: Honest | None) -> DHTRecord:
        stretch = self.rng.choice([1e-3, 0.5, 5, 30, 3600])
        return dht_record(target.key, target.identity.peer_id, target.value, target.expiration + stretch)

    def _wrong_types(self, target: Honest, _: Honest | None) -> DHTRecord:
        names = _INDEX_FIELDS if target.key == MODELS_INDEX_KEY else tuple(_FIELD_KIND)
        name = self.rng.choice(names)
        fields = {**target.fields, name: self.rng.choice(_WRONG_TYPES[_FIELD_KIND[name]])}
        return dht_record(target.key, target.identity.peer_id, self._resign(target, fields), target.expiration)

    def _bad_values(self, target: Honest, _: Honest | None) -> DHTRecord:
        fields = dict(target.fields)
        if target.key == MODELS_INDEX_KEY:
            fields["model_name"] = self.rng.choice(_BAD_VALUES["model_name"])
        elif self.rng.random() < 0.15:  # each valid alone, not together
            fields["start_layer"], fields["end_layer"] = fields["end_layer"], fields["start_layer"]
        elif self.rng.random() < 0.15:
            fields["end_layer"] = fields["num_layers"] + self.rng.randint(1, 10)
        else:
            name = self.rng.choice([name for name, bad in _BAD_VALUES.items() if bad])
            fields[name] = self.rng.choice(_BAD_VALUES[name])
        return dht_record(target.key, target.identity.peer_id, self._resign(target, fields), target.expiration)

    def _missing_field(self, target: Honest, _: Honest | None) -> DHTRecord:
        required = _INDEX_FIELDS if target.key == MODELS_INDEX_KEY else (
            "peer_id", "public_key", "signed_at", "address", "model_name", "start_layer", "end_layer",
            "num_layers", "dtype",
        )
        fields = dict(target.fields)
        del fields[self.rng.choice(required)]
        return dht_record(target.key, target.identity.peer_id, self._resign(target, fields), target.expiration)

    def _oversized(self, target: Honest, _: Honest | None) -> DHTRecord:
        rng = self.rng
        fields = dict(target.fields)
        choice = rng.random()
        if choice < 0.4:  # a newer-version field too big for any record
            fields["padding"] = "p" * rng.randint(MAX_RECORD_BYTES, 4 * MAX_RECORD_BYTES)
        elif choice < 0.6:  # nesting too deep for the record's size (msgpack's own packer would refuse it)
            fields["nested"] = _Raw(b"\x91" * rng.randint(3100, 6000) + b"\x01")
        elif choice < 0.8 and target.key != MODELS_INDEX_KEY:
            fields["tls_cert"] = fake_pem(rng, rng.randint(3200, 7000))
        else:
            fields["many"] = {str(i): i for i in range(rng.randint(800, 3000))}
        if isinstance(fields.get("nested"), _Raw):
            return dht_record(target.key, target.identity.peer_id, _pack_raw(fields, target.value["signature"]),
                              target.expiration)
        value = self._resign(target, fields) if choice >= 0.2 else {**target.value, "fields": fields}
        return dht_record(target.key, target.identity.peer_id, value, target.expiration)

    def _wrong_key(self, target: Honest, _: Honest | None) -> DHTRecord:
        rng = self.rng
        choice = rng.random()
        if choice < 0.5 and target.key != MODELS_INDEX_KEY:
            key: str | bytes = rng.choice([model_key("fuzz/other"), "brigade:model:" + FUZZ_MODEL + "x", "expert.0",
                                           rng.randbytes(20), rng.randbytes(rng.randint(0, 40))])
            return dht_record(key, target.identity.peer_id, target.value, target.expiration)
        if choice < 0.75 and target.key == MODELS_INDEX_KEY:  # an index entry where a peer record belongs
            return dht_record(model_key(target.fields["model_name"]), target.identity.peer_id, target.value,
                              target.expiration)
        return dht_record(target.key, None, target.value, target.expiration)  # a plain value shadowing the subkeys

    def _junk_value(self, target: Honest, _: Honest | None) -> DHTRecord:
        rng = self.rng
        junk = rng.choice([
            rng.randbytes(rng.randint(0, 300)), None, 7, "record", [target.value], {"fields": target.fields},
            {**target.value, "extra": 1}, {"fields": [1], "signature": target.value["signature"]},
            {"signature": target.value["signature"]}, b"\xc1", b"\xd4\x40\x00",  # never-used byte; an ext type
            MSGPackSerializer.dumps({"fields": target.fields, "signature": target.value["signature"]})[:-3],
            MSGPackSerializer.dumps((target.fields, target.value["signature"])),  # a tuple: hivemind's ext type
        ])
        return dht_record(target.key, target.identity.peer_id, junk, target.expiration)

    def _replay(self, target: Honest, older: Honest | None) -> DHTRecord:
        """The peer's own earlier record, byte for byte: valid, but older than what the node holds."""
        assert older is not None, "replays need the older record"
        return older.dht_record()

    def _replay_stretched(self, target: Honest, older: Honest | None) -> DHTRecord:
        assert older is not None, "replays need the older record"
        stretch = target.expiration - older.expiration + self.rng.choice([1e-3, 1, 20])
        return dht_record(older.key, older.identity.peer_id, older.value, older.expiration + stretch)


@dataclass(frozen=True)
class _Raw:
    """msgpack bytes to splice in as they are."""

    data: bytes


def _pack_raw(fields: dict[str, Any], signature: str) -> bytes:
    """The envelope's msgpack with ``_Raw`` field values spliced in byte for byte."""
    packer = msgpack.Packer(use_bin_type=True)
    out = packer.pack_map_header(2) + packer.pack("fields") + packer.pack_map_header(len(fields))
    for name, value in fields.items():
        out += packer.pack(name) + (value.data if isinstance(value, _Raw) else packer.pack(value))
    return out + packer.pack("signature") + packer.pack(signature)


def _changed(value: Any, rng: random.Random) -> Any:
    """A different value of the same type (what tampering in transit would produce)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-1, 1, 7])
    if isinstance(value, float):
        return value + rng.choice([-1.0, 0.5, 100.0])
    if isinstance(value, str):
        return value + "x" if value else "x"
    if isinstance(value, dict):
        return {**value, random_peer_id(rng): 1.0}
    return "changed" if value is None else None


# --------------------------------------------------------------------------- hypothesis strategies
_DTYPE_NAMES = ["float32", "float16", "bfloat16", "int64", "float64", "", "FLOAT32", "float32\x00", "bool"]


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Anything msgpack or JSON could carry, including what breaks naive code (NaN, huge ints, bytes)."""
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | st.binary(max_size=40)
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
        max_leaves=max_leaves,
    )


@st.composite
def wire_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Tensors whose every field may lie: unknown dtypes, negative or huge dims, short or long data."""
    dtype = draw(st.sampled_from(_DTYPE_NAMES) | st.text(max_size=12))
    dim = st.integers(-3, 6) | st.integers(-(1 << 63), (1 << 63) - 1) | st.sampled_from([1 << 20, (1 << 20) + 1])
    shape = draw(st.lists(dim, max_size=5))
    consistent = all(0 <= d <= 64 for d in shape) and math.prod(shape) <= 4096
    if draw(st.booleans()) and consistent and dtype in ("float32", "float16", "bfloat16"):
        itemsize = 4 if dtype == "float32" else 2
        size = math.prod(shape) * itemsize
        data = draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=size + 8))
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def session_ids() -> st.SearchStrategy[str]:
    valid = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=8, max_size=64)
    return valid | st.text(max_size=80)


u32 = st.integers(0, (1 << 32) - 1)


@st.composite
def open_sessions(draw: st.DrawFn) -> pb.OpenSession:
    start = draw(st.integers(0, 12) | u32)
    return pb.OpenSession(
        session_id=draw(session_ids()), start_layer=start, end_layer=draw(st.integers(0, 12) | u32),
        batch_size=draw(st.integers(0, 8) | u32), max_length=draw(st.integers(0, 4096) | u32),
        pad_lengths=draw(st.lists(st.integers(0, 16) | u32, max_size=10)),
        open_timeout_s=draw(st.floats(width=32)),
    )


@st.composite
def inference_requests(draw: st.DrawFn) -> pb.InferenceRequest:
    """Either kind of Inference stream message, or neither (an empty oneof), with adversarial fields."""
    kind = draw(st.sampled_from(["open", "step", "empty"]))
    session_id = draw(session_ids())
    if kind == "open":
        return pb.InferenceRequest(open=draw(open_sessions()), session_id=session_id)
    if kind == "step":
        step = pb.Step(hidden=draw(wire_tensors()), start_position=draw(st.integers(0, 64) | u32),
                       step_id=draw(st.integers(0, (1 << 64) - 1)))
        return pb.InferenceRequest(step=step, session_id=session_id)
    return pb.InferenceRequest(session_id=session_id)


@st.composite
def forward_requests(draw: st.DrawFn) -> pb.ForwardRequest:
    return pb.ForwardRequest(
        start_layer=draw(st.integers(0, 12) | u32), end_layer=draw(st.integers(0, 12) | u32),
        hidden=draw(wire_tensors()), pad_lengths=draw(st.lists(st.integers(0, 16) | u32, max_size=10)),
    )


@st.composite
def mutated_bytes(draw: st.DrawFn, messages: st.SearchStrategy[Any]) -> bytes:
    """A valid message's encoding with bytes flipped, cut, inserted or repeated: what protobuf's
    parser meets from a broken or hostile sender, while staying close enough to reach the decoders."""
    data = bytearray(draw(messages).SerializeToString())
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += data[at:]
    return bytes(data)


def raw_bytes_or(messages: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Random bytes, or a mutated encoding of ``messages``."""
    return st.binary(max_size=512) | mutated_bytes(messages)


@st.composite
def dht_records(draw: st.DrawFn, honest: Callable[[random.Random], Honest]) -> DHTRecord:
    """A DHT record as a validator receives it: arbitrary bytes anywhere, or arbitrary data in a
    well-formed envelope, under brigade's keys or others; ``honest(rng)`` gives a record to disfigure."""
    target = honest(draw(st.randoms(use_true_random=False)))
    key = draw(st.sampled_from([target.key, MODELS_INDEX_KEY, model_key("fuzz/other")]) | st.binary(max_size=24))
    subkey = draw(st.sampled_from([target.identity.peer_id, None]) | json_values(5))
    choice = draw(st.sampled_from(["bytes", "json", "fields", "envelope"]))
    if choice == "bytes":
        value: Any = draw(st.binary(max_size=MAX_VALUE_BYTES + 16))
    elif choice == "json":
        value = draw(json_values())
    elif choice == "fields":  # honest fields with one replaced, validly signed
        name = draw(st.sampled_from(sorted(target.fields)))
        fields = {**target.fields, name: draw(json_values(8))}
        try:
            value = sign_fields(fields, target.identity)
        except (TypeError, ValueError):  # not JSON at all (bytes, NaN keys): send it unsigned
            value = {"fields": fields, "signature": target.value["signature"]}
    else:
        value = {"fields": draw(json_values() | st.just(target.fields)), "signature": draw(st.text(max_size=140))}
    try:
        return dht_record(key, subkey, value, draw(st.floats()))
    except (TypeError, ValueError, OverflowError):  # msgpack cannot carry it (ints over 64 bits): raw bytes instead
        return DHTRecord(key if isinstance(key, bytes) else b"k", b"\xa1x", b"\xc0", 0.0)
