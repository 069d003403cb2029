"""The signed records peers store in the DHT, and the one envelope they all travel in.

Two kinds of record, both signed by the peer that owns them and stored under its own peer id as
subkey:

- ``PeerRecord`` under ``brigade:model:<name>``: where a peer is, which layers it serves, how well,
  and how to reach it securely (its TLS certificate, or a relay).
- ``IndexEntry`` under ``brigade:models``: a small pointer saying "this peer serves model X", so
  that a crawler (the dashboard) can find every model without knowing their names.

Each record carries ``expires_at`` inside its signature: a DHT node refuses a store whose
expiration is later than that (see ``routing/validator.py``), so an old record replayed by someone
else can never outlive the time its owner gave it, and a newer one (later expiry) always wins.
A record may live at most ``MAX_RECORD_TTL_S`` past its signing, so nobody can park a record for
hours, not even its owner.

Records tolerate unknown fields (peers of two versions share a swarm): the signature covers the
whole dict as sent, and parsing keeps only the fields this version knows.

Two levels of checking. The models themselves bound every string, number and dict (so nothing
built in code can be absurd), but stay lax about types and formats so that tests and simulations
can build records of made-up peers. Data from the DHT goes through ``check_signed``, which adds
strict types (no "3" for 3, no bool for an int) and the wire formats (peer id, key, address,
hashes), checks the signature before the schema, and says why a record was refused.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from brigade.protocol.identity import Identity, peer_id_of, verify

PROTOCOL_VERSION = "brigade/0.1"
MAX_RECORD_BYTES = 6144  # a record with a TLS certificate is ~1.5 KB; anything much bigger is junk or an attack
MAX_PINGS = 8  # round trips a record may carry (to the peers that serve the layers right after it)
MAX_RECORD_TTL_S = 60.0  # s a record may live past its signing (peers use 20 s; `--record-ttl` may not exceed this)
MODELS_INDEX_KEY = "brigade:models"  # where every peer also stores an IndexEntry naming its model
MODEL_KEY_PREFIX = "brigade:model:"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")

# Wire formats, checked only on records read from the DHT (see the module docstring).
_BASE58 = "1-9A-HJ-NP-Za-km-z"
PEER_ID_PATTERN = re.compile(rf"^bp[{_BASE58}]{{1,32}}$")  # "bp" + base58 of 16 bytes: 22-24 chars
_RELAY_ID = re.compile(rf"^[{_BASE58}]{{1,64}}$")  # a brigade or libp2p peer id
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")  # an Ed25519 signature, hex
_TOKEN = re.compile(r"^[A-Za-z0-9._+-]{1,32}$")  # dtype, quantization
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_PEM = re.compile(r"^[\x20-\x7e\r\n]*$")

PeerState = Literal["online", "leaving"]
# Bounds that any sensible record meets: the schema enforces them even on records built in code.
_Id = Annotated[str, StringConstraints(max_length=64)]
_Text = Annotated[str, StringConstraints(max_length=64)]
_Time = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]  # DHT time (Unix seconds) or 0
_Rate = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
_Layer = Annotated[int, Field(ge=0, le=1 << 20)]
_PingMs = Annotated[float, Field(ge=0, le=1e7, allow_inf_nan=False)]


def model_key(model_name: str) -> str:
    """The DHT key under which every peer of ``model_name`` stores its record."""
    if not _MODEL_NAME.fullmatch(model_name):
        raise ValueError(f"model name {model_name!r} must match {_MODEL_NAME.pattern}")
    return f"{MODEL_KEY_PREFIX}{model_name}"


class RecordError(ValueError):
    """A DHT value is not an acceptable record; the message says which check it failed."""


class SignedFields(BaseModel):
    """Fields every signed record has: who signed it, and the window in which it is valid."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    peer_id: _Id
    public_key: Annotated[str, StringConstraints(max_length=128)]  # hex of the raw Ed25519 public key
    signed_at: _Time  # DHT time of signing; newer wins
    expires_at: _Time = 0.0  # DHT time after which the record is void (0 = unset, only before signing)


class PeerRecord(SignedFields):
    """What a peer announces: where it is, which layers it serves, and how well."""

    version: _Text = PROTOCOL_VERSION
    software_version: _Text = ""  # brigade package version of the peer
    address: Annotated[str, StringConstraints(max_length=300)]  # "host:port" of the gRPC service (the relay's
    # address when relay_peer_id is set); IPv6 hosts in brackets: "[::1]:5000"
    model_name: Annotated[str, StringConstraints(max_length=128)]
    start_layer: _Layer
    end_layer: Annotated[int, Field(gt=0, le=1 << 20)]
    num_layers: Annotated[int, Field(gt=0, le=1 << 20)]  # of the whole model, so clients can check coverage
    dtype: _Text
    quantization: _Text = "none"
    batch_invariant: bool = False  # computes one step per pass in fixed chunks (peer --batch-invariant)
    vouches_pushes: bool = False  # signs its pushes and echoes what it was pushed (client/handover.py)
    push_tickets: bool = False  # takes pushes only with the client's tickets, passes them on (protocol/tickets.py)
    throughput: _Rate = 0.0  # tokens/s per layer (decode, batch 1); 0 = unmeasured
    prefill_throughput: _Rate = 0.0  # tokens/s per layer for a prefill chunk; 0 = unmeasured
    free_cache_tokens: Annotated[int, Field(ge=0, le=1 << 48)] = 0
    state: PeerState = "online"
    started_at: _Time = 0.0  # DHT time the peer process started serving (for uptime)
    pings: dict[_Id, _PingMs] = Field(default_factory=dict, max_length=MAX_PINGS)  # peer id -> round trip ms
    tls_cert: Annotated[str, StringConstraints(max_length=4096)] = ""  # PEM of the peer's self-signed
    # certificate; "" = plain-text gRPC (--insecure)
    tls_spki_sha256: Annotated[str, StringConstraints(max_length=64)] = ""  # hex SHA-256 of that certificate's
    # public key: what clients pin
    reachable: bool | None = None  # the peer's own reachability verdict; None = not checked
    relay_peer_id: _Id = ""  # set when clients reach this peer through a relay (address is the relay's)
    relay_address: Annotated[str, StringConstraints(max_length=300)] = ""  # "host:port" where this peer
    # relays for unreachable peers (its relay port, docs/relays.md); "" = it offers no relaying

    def spans(self, start: int, end: int) -> bool:
        return self.start_layer <= start and end <= self.end_layer


class IndexEntry(SignedFields):
    """A pointer from the global models index to one peer's model."""

    model_name: Annotated[str, StringConstraints(max_length=128)]


RecordT = TypeVar("RecordT", bound=SignedFields)


def _canonical(fields: dict[str, Any]) -> bytes:
    # allow_nan=False: NaN has no JSON form, and a record carrying one is junk anyway.
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign(record: SignedFields, identity: Identity) -> dict[str, Any]:
    """The DHT value for ``record``: its fields and a signature over them."""
    if record.peer_id != identity.peer_id or record.public_key != identity.public_key.hex():
        raise ValueError("a record must be signed by the identity it names")
    if record.expires_at <= record.signed_at:
        raise ValueError("a record must expire after it is signed (set expires_at)")
    if record.expires_at - record.signed_at > MAX_RECORD_TTL_S:
        raise ValueError(f"a record may live at most {MAX_RECORD_TTL_S:.0f} s past its signing")
    fields = record.model_dump()
    return {"fields": fields, "signature": identity.sign(_canonical(fields)).hex()}


def check_signed(value: Any, schema: type[RecordT], expected_peer_id: str | None = None) -> RecordT:
    """The ``schema`` record in a DHT value; raises RecordError (and nothing else) saying why not.

    Cheap checks first, then the signature, then the schema: junk costs no signature check, and
    a schema error is only ever reported for a record its owner really signed.
    """
    if not isinstance(value, dict) or not isinstance(value.get("fields"), dict):
        raise RecordError("not a signed record: no 'fields' dict")
    fields, signature = value["fields"], value.get("signature")
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise RecordError("the signature is not 64 bytes of lowercase hex")
    try:
        canonical = _canonical(fields)
    except (TypeError, ValueError, RecursionError) as e:  # keys that are not str, bytes, NaN, deep nesting
        raise RecordError(f"the fields are not plain JSON ({type(e).__name__})") from None
    if len(canonical) > MAX_RECORD_BYTES:
        raise RecordError(f"the record is {len(canonical)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    peer_id, public_key = fields.get("peer_id"), fields.get("public_key")
    if not isinstance(public_key, str) or not _HEX64.fullmatch(public_key):
        raise RecordError("public_key is not 32 bytes of lowercase hex")
    if not isinstance(peer_id, str) or peer_id != peer_id_of(bytes.fromhex(public_key)):
        raise RecordError("peer_id does not derive from public_key")
    if expected_peer_id is not None and peer_id != expected_peer_id:
        raise RecordError(f"the record of {peer_id} sits under another peer's subkey")
    if not verify(bytes.fromhex(public_key), bytes.fromhex(signature), canonical):
        raise RecordError("bad signature")
    try:
        record = schema.model_validate(fields, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RecordError(f"schema: {where}: {first['msg']}") from None
    problem = _wire_problem(record)
    if problem is not None:
        raise RecordError(problem)
    return record


def parse_signed(value: Any, schema: type[RecordT], expected_peer_id: str | None = None) -> RecordT | None:
    """The ``schema`` record in a DHT value if its size, schema and signature check out, else None."""
    try:
        return check_signed(value, schema, expected_peer_id)
    except RecordError:
        return None


def _wire_problem(record: SignedFields) -> str | None:
    """What is wrong with a signed, schema-valid record read from the DHT, or None."""
    if not PEER_ID_PATTERN.fullmatch(record.peer_id):
        return "peer_id is not a brigade peer id"
    if record.expires_at <= record.signed_at:
        return "the record expires before it was signed"
    if record.expires_at - record.signed_at > MAX_RECORD_TTL_S:
        return f"the record lives {record.expires_at - record.signed_at:.0f} s, over {MAX_RECORD_TTL_S:.0f} s"
    if not _MODEL_NAME.fullmatch(getattr(record, "model_name", "")):  # both schemas name a model
        return "model_name is not a valid model name"
    if not isinstance(record, PeerRecord):
        return None
    if not (record.start_layer < record.end_layer <= record.num_layers):
        return "the layers are not a span [start, end) within num_layers"
    if not (_TOKEN.fullmatch(record.dtype) and _TOKEN.fullmatch(record.quantization)):
        return "dtype or quantization is not a short token"
    if not (_PRINTABLE.fullmatch(record.version) and _PRINTABLE.fullmatch(record.software_version)):
        return "version strings must be printable ASCII"
    if parse_address(record.address) is None:
        return "address is not host:port"
    if record.tls_spki_sha256 and not _HEX64.fullmatch(record.tls_spki_sha256):
        return "tls_spki_sha256 is not 32 bytes of lowercase hex"
    if not _PEM.fullmatch(record.tls_cert):
        return "tls_cert is not PEM text"
    if record.relay_peer_id and not _RELAY_ID.fullmatch(record.relay_peer_id):
        return "relay_peer_id is not a peer id"
    if record.relay_address and parse_address(record.relay_address) is None:
        return "relay_address is not host:port"
    if not all(_RELAY_ID.fullmatch(peer) for peer in record.pings):
        return "pings must be keyed by peer ids"
    return None


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a dialable "host:port" (IPv4, "[IPv6]" or a DNS name, port 1-65535), else None."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), port
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(host)), port
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        return None
    return host, port


def sign_record(record: PeerRecord, identity: Identity) -> dict[str, Any]:
    return sign(record, identity)


def parse_signed_record(value: Any, expected_peer_id: str | None = None) -> PeerRecord | None:
    return parse_signed(value, PeerRecord, expected_peer_id)


def model_name_for(model: str) -> str:
    """The DHT name of a model: a Hub repo id as is, a local folder by its directory name.

    Peers and clients must agree on it; both accept an explicit ``--model-name`` when the folder
    names differ between machines.
    """
    path = Path(model)
    name = path.resolve().name if path.is_dir() else model
    model_key(name)  # validates
    return name


def newest_per_peer(records: Iterable[PeerRecord]) -> dict[str, PeerRecord]:
    """Each peer's most recently signed record: reads merged from several nodes or snapshots hold
    older copies, and only the newest says where a peer is now."""
    newest: dict[str, PeerRecord] = {}
    for record in records:
        held = newest.get(record.peer_id)
        if held is None or record.signed_at > held.signed_at:
            newest[record.peer_id] = record
    return newest
