"""The signed records peers store in the DHT, and the one envelope they all travel in.

Two kinds of record, both signed by the peer that owns them and stored under its own peer id as
subkey:

- ``PeerRecord`` under ``brigade:model:<name>``: where a peer is, which layers it serves, how well,
  and how to reach it securely (its TLS certificate, or a relay).
- ``IndexEntry`` under ``brigade:models``: a small pointer saying "this peer serves model X", so
  that a crawler (the dashboard) can find every model without knowing their names.

Each record carries ``expires_at`` inside its signature: a DHT node refuses a store whose
expiration is later than that (see the DHT validator), so an old record replayed by someone else
can never outlive the time its owner gave it, and a newer one (later expiry) always wins.

Records tolerate unknown fields (peers of two versions share a swarm): the signature covers the
whole dict as sent, and parsing keeps only the fields this version knows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from brigade.protocol.identity import Identity, peer_id_of, verify

PROTOCOL_VERSION = "brigade/0.1"
MAX_RECORD_BYTES = 6144  # a record with a TLS certificate is ~1.5 KB; anything much bigger is junk or an attack
MAX_PINGS = 8  # round trips a record may carry (to the peers that serve the layers right after it)
MODELS_INDEX_KEY = "brigade:models"  # where every peer also stores an IndexEntry naming its model
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")

PeerState = Literal["online", "leaving"]


def model_key(model_name: str) -> str:
    """The DHT key under which every peer of ``model_name`` stores its record."""
    if not _MODEL_NAME.match(model_name):
        raise ValueError(f"model name {model_name!r} must match {_MODEL_NAME.pattern}")
    return f"brigade:model:{model_name}"


class SignedFields(BaseModel):
    """Fields every signed record has: who signed it, and the window in which it is valid."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    peer_id: str
    public_key: str  # hex of the raw Ed25519 public key; peer_id must derive from it
    signed_at: float  # DHT time of signing; newer wins
    expires_at: float = 0.0  # DHT time after which the record is void (0 = unset, only before signing)


class PeerRecord(SignedFields):
    """What a peer announces: where it is, which layers it serves, and how well."""

    version: str = PROTOCOL_VERSION
    software_version: str = ""  # brigade package version of the peer
    address: str  # "host:port" of the gRPC service (the relay's address when relay_peer_id is set)
    model_name: str
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)
    num_layers: int = Field(gt=0)  # of the whole model, so clients can check coverage
    dtype: str
    quantization: str = "none"
    throughput: float = Field(default=0.0, ge=0)  # tokens/s per layer (decode, batch 1); 0 = unmeasured
    prefill_throughput: float = Field(default=0.0, ge=0)  # tokens/s per layer for a prefill chunk; 0 = unmeasured
    free_cache_tokens: int = Field(default=0, ge=0)
    state: PeerState = "online"
    started_at: float = 0.0  # DHT time the peer process started serving (for uptime)
    pings: dict[str, float] = Field(default_factory=dict, max_length=MAX_PINGS)  # peer id -> round trip ms
    tls_cert: str = ""  # PEM of the peer's self-signed certificate; "" = plain-text gRPC (--insecure)
    tls_spki_sha256: str = ""  # hex SHA-256 of that certificate's public key: what clients pin
    reachable: bool | None = None  # the peer's own reachability verdict; None = not checked
    relay_peer_id: str = ""  # set when clients reach this peer through a relay (address is the relay's)

    def spans(self, start: int, end: int) -> bool:
        return self.start_layer <= start and end <= self.end_layer


class IndexEntry(SignedFields):
    """A pointer from the global models index to one peer's model."""

    model_name: str


RecordT = TypeVar("RecordT", bound=SignedFields)


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign(record: SignedFields, identity: Identity) -> dict[str, Any]:
    """The DHT value for ``record``: its fields and a signature over them."""
    if record.peer_id != identity.peer_id or record.public_key != identity.public_key.hex():
        raise ValueError("a record must be signed by the identity it names")
    if record.expires_at <= record.signed_at:
        raise ValueError("a record must expire after it is signed (set expires_at)")
    fields = record.model_dump()
    return {"fields": fields, "signature": identity.sign(_canonical(fields)).hex()}


def parse_signed(value: Any, schema: type[RecordT], expected_peer_id: str | None = None) -> RecordT | None:
    """The ``schema`` record in a DHT value if its size, schema and signature check out, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("fields"), dict):
        return None
    fields, signature = value["fields"], value.get("signature")
    if not isinstance(signature, str):
        return None
    try:
        canonical = _canonical(fields)
        if len(canonical) > MAX_RECORD_BYTES:
            return None
        record = schema.model_validate(fields)
        public_key = bytes.fromhex(record.public_key)
        signature_bytes = bytes.fromhex(signature)
    except (ValidationError, ValueError, TypeError, RecursionError):
        return None
    if peer_id_of(public_key) != record.peer_id:
        return None
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        return None
    if not _consistent(record):
        return None
    if not verify(public_key, signature_bytes, canonical):
        return None
    return record


def _consistent(record: SignedFields) -> bool:
    if record.expires_at <= record.signed_at:
        return False
    if isinstance(record, PeerRecord):
        return record.end_layer > record.start_layer and record.end_layer <= record.num_layers
    return True


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
