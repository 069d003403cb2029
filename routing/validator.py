"""The record validator every brigade DHT node runs: only owners' signed, sane records get in.

hivemind calls ``validate`` on every record a node is asked to store (by another node, or by its
own application) and on every record another node returns to one of its gets; a False answer
drops the store, or the whole answer of that node for that key. Records arrive serialized, as
hivemind's store and find RPCs carry them: the key as the 20-byte ``DHTID`` hash of the key string
(so model keys are checked by hashing the record's own model name), the subkey and the value as
msgpack bytes.

A record is accepted only when all of this holds:

- the key is ``brigade:models`` (holding ``IndexEntry``) or ``brigade:model:<name>`` (holding
  ``PeerRecord`` whose model_name is ``<name>``); no other key, and no plain value without a
  subkey (one of those, stored with a far expiry, would shadow every peer's subkey);
- the serialized value is at most ``MAX_VALUE_BYTES``;
- the subkey is the signer's peer id, the signature checks out, the schema and wire formats hold
  (``protocol.records.check_signed``);
- the DHT expiration is no later than the record's signed ``expires_at``: a replayed record cannot
  outlive what its owner signed, so a newer record (later expiry) always wins the subkey;
- ``expires_at`` is at most ``MAX_RECORD_TTL_S`` after ``signed_at`` and, on nodes that store for
  others, at most ``MAX_RECORD_TTL_S + MAX_CLOCK_SKEW_S`` after the node's own clock;
- the signer passes the node's ``PeerFilter`` (allowlist / blocklist), when it has one.

The clock check runs only on nodes that store for others. A client-mode node (client, dashboard)
only ever validates what others return, and hivemind drops a node's whole answer for a key when
one of its records fails: were readers to check the clock, one record stored at the edge of the
bound on a node whose clock runs ahead of theirs would hide every honest record held there.
Readers drop such a record on its own in ``routing/swarm.py`` instead.

A bad record is logged at debug level and refused; ``validate`` never raises into hivemind.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict
from typing import Any

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from brigade.protocol.records import (
    MAX_RECORD_BYTES,
    MAX_RECORD_TTL_S,
    MODELS_INDEX_KEY,
    IndexEntry,
    PeerRecord,
    RecordError,
    SignedFields,
    check_signed,
    model_key,
)
from brigade.routing.peer_filter import PeerFilter

logger = logging.getLogger(__name__)

MAX_VALUE_BYTES = MAX_RECORD_BYTES + 1024  # msgpack of the fields plus the 128-char signature and framing
MAX_SUBKEY_BYTES = 64  # msgpack of a peer id is ~25 bytes
MAX_CLOCK_SKEW_S = 30.0  # s a storing node tolerates between the signer's clock and its own
MEMO_SIZE = 2048  # records whose time-independent checks passed (~1.5 KB each, 5 KB at most), remembered to
# skip their signature check: one entry per live peer and key covers swarms of about a thousand peers
_ENVELOPE_KEYS = frozenset({"fields", "signature"})


class RecordValidator(RecordValidatorBase):
    """Accepts only brigade's signed records; see the module docstring for the rules.

    Picklable (plain attributes only): hivemind may ship validators to the DHT's child process.
    """

    def __init__(
        self,
        *,
        peer_filter: PeerFilter | None = None,
        check_clock: bool = True,
        max_clock_skew_s: float = MAX_CLOCK_SKEW_S,
    ):
        """``check_clock=False`` for client-mode nodes (they store nothing for others; see above)."""
        self.peer_filter = peer_filter if peer_filter is not None and not peer_filter.is_open else None
        self.check_clock = check_clock
        self.max_ahead_s = MAX_RECORD_TTL_S + max_clock_skew_s  # how far past now a record may expire
        self._index_key = key_id(MODELS_INDEX_KEY)
        self._memo: OrderedDict[bytes, SignedFields] = OrderedDict()  # digest of key+subkey+value -> record

    @property
    def priority(self) -> int:
        # Validated before lower-priority validators (signature-style validators use 10 in hivemind):
        # junk is refused before anything else spends time on it.
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # Never merge: two brigade validators (say, with different allowlists) must both pass.
        return False

    def validate(self, record: DHTRecord) -> bool:
        try:
            reason = self.rejection(record, get_dht_time())
        except Exception:  # a bug here must refuse the record, not break the DHT node's RPC handler
            logger.debug("refused a DHT record: the validator failed on it", exc_info=True)
            return False
        if reason is not None:
            logger.debug("refused a DHT record (subkey %r): %s", record.subkey[:MAX_SUBKEY_BYTES], reason)
            return False
        return True

    def rejection(self, record: DHTRecord, now: float) -> str | None:
        """Why ``record`` is refused at DHT time ``now``, or None when it is accepted.

        Reads no clock and does no I/O, so tests can check every rule at any time they choose.
        """
        if len(record.value) > MAX_VALUE_BYTES:
            return f"value of {len(record.value)} bytes, over the {MAX_VALUE_BYTES}-byte limit"
        subkey = _unpack(record.subkey) if len(record.subkey) <= MAX_SUBKEY_BYTES else None
        if not isinstance(subkey, str):
            return "the subkey is not a peer id (brigade stores every record under its signer's id)"
        if self.peer_filter is not None and not self.peer_filter.admits(subkey):
            return f"peer {subkey} is not admitted by this node's allowlist/blocklist"
        parsed = self._signed_record(record, subkey)
        if isinstance(parsed, str):
            return parsed
        if record.expiration_time > parsed.expires_at:
            return (
                f"the DHT expiration {record.expiration_time:.3f} is later than the signed expiry "
                f"{parsed.expires_at:.3f} (a replayed or stretched record)"
            )
        if self.check_clock and parsed.expires_at > now + self.max_ahead_s:
            return f"expires {parsed.expires_at - now:.0f} s from now, over the {self.max_ahead_s:.0f}-s bound"
        return None

    def _signed_record(self, record: DHTRecord, subkey: str) -> SignedFields | str:
        """The record in ``record`` if every check that does not depend on time passes, else why not.

        Remembers recent successes: readers fetch the same records every few seconds, and the
        signature check is most of a validation's cost (~0.1 ms). Failures are not remembered, so
        junk cannot push honest records out of the memo any faster than new honest records do.
        """
        framing = struct.pack("<II", len(record.key), len(record.subkey))  # no two splits hash alike
        digest = hashlib.sha256(framing + record.key + record.subkey + record.value).digest()
        known = self._memo.get(digest)
        if known is not None:
            return known
        value = _unpack(record.value)
        if not isinstance(value, dict) or value.keys() != _ENVELOPE_KEYS:
            return "the value is not a {fields, signature} record"
        schema: type[SignedFields] = IndexEntry if record.key == self._index_key else PeerRecord
        try:
            parsed = check_signed(value, schema, expected_peer_id=subkey)
        except RecordError as e:
            return str(e)
        if isinstance(parsed, PeerRecord) and record.key != key_id(model_key(parsed.model_name)):
            return f"a record of model {parsed.model_name!r} under a key that is not that model's"
        self._memo[digest] = parsed
        if len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return parsed

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memo": OrderedDict()}  # the memo stays in the process that built it


def key_id(key: str) -> bytes:
    """The bytes a validator sees for ``key``: hivemind hashes keys into DHT ids before they travel."""
    return DHTID.generate(source=key).to_bytes()


def _unpack(data: bytes) -> Any:
    """msgpack without hivemind's extension types: a record is plain data, anything else is junk."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several types (ExtraData, FormatError, StackError, ValueError, ...)
        return None
