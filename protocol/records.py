"""The signed record each peer stores in the DHT, under its model's key and its own id as subkey.

Records tolerate unknown fields (peers of two versions share a swarm): the signature covers the
whole dict as sent, and parsing keeps only the fields this version knows.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from brigade.protocol.identity import Identity, peer_id_of, verify

PROTOCOL_VERSION = "brigade/0.1"
MAX_RECORD_BYTES = 4096  # a record is a few hundred bytes; anything bigger is junk or an attack
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")

PeerState = Literal["online", "leaving"]


def model_key(model_name: str) -> str:
    """The DHT key under which every peer of ``model_name`` stores its record."""
    if not _MODEL_NAME.match(model_name):
        raise ValueError(f"model name {model_name!r} must match {_MODEL_NAME.pattern}")
    return f"brigade:model:{model_name}"


class PeerRecord(BaseModel):
    """What a peer announces: where it is, which layers it serves, and how well."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: str = PROTOCOL_VERSION
    peer_id: str
    public_key: str  # hex of the raw Ed25519 public key; peer_id must derive from it
    address: str  # "host:port" of the gRPC service
    model_name: str
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)
    num_layers: int = Field(gt=0)  # of the whole model, so clients can check coverage
    dtype: str
    quantization: str = "none"
    throughput: float = Field(default=0.0, ge=0)  # tokens/s per layer (decode); 0 = unmeasured
    free_cache_tokens: int = Field(default=0, ge=0)
    state: PeerState = "online"
    signed_at: float  # DHT time of signing; newer wins

    def spans(self, start: int, end: int) -> bool:
        return self.start_layer <= start and end <= self.end_layer


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign_record(record: PeerRecord, identity: Identity) -> dict[str, Any]:
    """The DHT value for ``record``: its fields and a signature over them."""
    if record.peer_id != identity.peer_id or record.public_key != identity.public_key.hex():
        raise ValueError("a record must be signed by the identity it names")
    fields = record.model_dump()
    return {"fields": fields, "signature": identity.sign(_canonical(fields)).hex()}


def parse_signed_record(value: Any, expected_peer_id: str | None = None) -> PeerRecord | None:
    """The record in a DHT value if its signature, schema and size check out, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("fields"), dict):
        return None
    fields, signature = value["fields"], value.get("signature")
    if not isinstance(signature, str):
        return None
    try:
        canonical = _canonical(fields)
        if len(canonical) > MAX_RECORD_BYTES:
            return None
        record = PeerRecord.model_validate(fields)
        public_key = bytes.fromhex(record.public_key)
        signature_bytes = bytes.fromhex(signature)
    except (ValidationError, ValueError, TypeError):
        return None
    if peer_id_of(public_key) != record.peer_id:
        return None
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        return None
    if record.end_layer <= record.start_layer or record.end_layer > record.num_layers:
        return None
    if not verify(public_key, signature_bytes, canonical):
        return None
    return record


def model_name_for(model: str) -> str:
    """The DHT name of a model: a Hub repo id as is, a local folder by its directory name.

    Peers and clients must agree on it; both accept an explicit ``--model-name`` when the folder
    names differ between machines.
    """
    from pathlib import Path

    path = Path(model)
    name = path.resolve().name if path.is_dir() else model
    model_key(name)  # validates
    return name
