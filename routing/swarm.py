"""Reading the swarm: every valid peer record of one model, or every index entry, from one DHT get.

Anyone can store anything in the DHT, so every value is checked (signature, schema, size, and
that it sits under its own peer id's subkey) before it reaches route finding; a bad record is
dropped and logged at debug level, never raised, so one broken or hostile peer cannot stop a
client from reading the rest. Our own DHT node's validator already refuses most junk; these
checks repeat the per-record ones because hivemind hands back what it stored without validating
its own storage again, and because a reader can add its own ``PeerFilter`` and clock bound per
record (the validator of a client-mode node cannot check the clock: see ``routing/validator.py``).
A DHT that does not answer in time reads as an empty swarm: the caller (route finding) then
reports which layers are missing, which is the useful message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from brigade.protocol.records import (
    MAX_RECORD_TTL_S,
    MODELS_INDEX_KEY,
    IndexEntry,
    PeerRecord,
    RecordError,
    RecordT,
    check_signed,
    model_key,
)
from brigade.routing.peer_filter import PeerFilter
from brigade.routing.validator import MAX_CLOCK_SKEW_S

logger = logging.getLogger(__name__)


async def fetch_records(
    dht: hivemind.DHT, model_name: str, *, timeout_s: float = 5.0, peer_filter: PeerFilter | None = None
) -> list[PeerRecord]:
    """The valid records of ``model_name``'s peers; [] when the DHT does not answer within ``timeout_s``.

    ``peer_filter`` keeps only the peers it admits. Does not block the event loop: the get runs in
    the DHT's process and is awaited as a future. Raises ValueError only for an invalid
    ``model_name`` (a caller bug, not a DHT condition).
    """
    entries = await _get_subkeys(dht, model_key(model_name), timeout_s)
    return parse_model_entries(model_name, entries, peer_filter)[0]


async def fetch_index(
    dht: hivemind.DHT, *, timeout_s: float = 5.0, peer_filter: PeerFilter | None = None
) -> list[IndexEntry]:
    """Every valid entry of the models index (one per live peer, naming its model); [] on timeout.

    For crawlers such as the dashboard: ``{entry.model_name for entry in entries}`` are the models
    the swarm serves, and ``fetch_records`` then reads each one's peers.
    """
    entries = await _get_subkeys(dht, MODELS_INDEX_KEY, timeout_s)
    return parse_entries(MODELS_INDEX_KEY, IndexEntry, entries, peer_filter)[0]


def parse_model_entries(
    model_name: str, entries: Mapping[Any, Any], peer_filter: PeerFilter | None = None
) -> tuple[list[PeerRecord], int]:
    """The valid records among ``entries`` (subkey -> raw DHT value) of ``model_name``'s key, and how
    many were dropped.

    The one check every reader applies (clients, peers, the dashboard's crawler and its recorded
    snapshots): signature, schema and size, stored under its own peer id, naming this model.
    """
    key = model_key(model_name)
    records, dropped = parse_entries(key, PeerRecord, entries, peer_filter)
    kept = []
    for record in records:
        if record.model_name != model_name:
            logger.debug("dropped %s's record under %s: it names model %r", record.peer_id, key, record.model_name)
            dropped += 1
        else:
            kept.append(record)
    return kept, dropped


def parse_entries(
    key: str, schema: type[RecordT], entries: Mapping[Any, Any], peer_filter: PeerFilter | None = None
) -> tuple[list[RecordT], int]:
    """The ``schema`` records among raw ``entries`` that pass every per-record check, and how many did not."""
    latest_expiry = get_dht_time() + MAX_RECORD_TTL_S + MAX_CLOCK_SKEW_S
    records: list[RecordT] = []
    for subkey, value in entries.items():
        try:
            if not isinstance(subkey, str):
                raise RecordError("the subkey is not a peer id")
            record = check_signed(value, schema, expected_peer_id=subkey)
            if record.expires_at > latest_expiry:
                raise RecordError("it expires too far in the future")
            if peer_filter is not None and not peer_filter.admits(record.peer_id):
                raise RecordError("this reader's allowlist/blocklist does not admit its signer")
        except RecordError as e:
            logger.debug("dropped a record under %s, subkey %r: %s", key, subkey, e)
            continue
        records.append(record)
    return records, len(entries) - len(records)


async def _get_subkeys(dht: hivemind.DHT, key: str, timeout_s: float) -> dict[Any, Any]:
    """``{subkey: raw value}`` stored under ``key``; {} when nothing is there or the DHT does not answer."""
    try:
        future = dht.get(key, latest=True, return_future=True)
        found = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        logger.warning("reading %s from the DHT timed out after %.1f s", key, timeout_s)
        return {}
    except Exception as e:  # the DHT process gone, a broken pipe, an error inside hivemind
        logger.warning("reading %s from the DHT failed: %r", key, e)
        return {}
    if found is None:
        return {}
    if not isinstance(found.value, dict):
        logger.debug("%s holds a plain value instead of per-peer subkeys; ignoring it", key)
        return {}
    return {subkey: getattr(entry, "value", None) for subkey, entry in found.value.items()}
