"""Reading the swarm: every valid peer record of one model, from one DHT get.

Anyone can store anything in the DHT, so every value is checked (signature, schema, size, and
that it sits under its own peer id's subkey) before it reaches route finding; a bad record is
dropped and logged at debug level, never raised, so one broken or hostile peer cannot stop a
client from reading the rest. A DHT that does not answer in time reads as an empty swarm: the
caller (route finding) then reports which layers are missing, which is the useful message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import hivemind

from brigade.protocol.records import PeerRecord, model_key, parse_signed_record

logger = logging.getLogger(__name__)


async def fetch_records(dht: hivemind.DHT, model_name: str, *, timeout_s: float = 5.0) -> list[PeerRecord]:
    """The valid records of ``model_name``'s peers; [] when the DHT does not answer within ``timeout_s``.

    Does not block the event loop: the get runs in the DHT's process and is awaited as a future.
    Raises ValueError only for an invalid ``model_name`` (a caller bug, not a DHT condition).
    """
    key = model_key(model_name)
    try:
        future = dht.get(key, latest=True, return_future=True)
        found = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        logger.warning("reading the peers of %s from the DHT timed out after %.1f s", model_name, timeout_s)
        return []
    except Exception as e:  # the DHT process gone, a broken pipe, an error inside hivemind
        logger.warning("reading the peers of %s from the DHT failed: %r", model_name, e)
        return []
    if found is None:
        return []
    if not isinstance(found.value, dict):
        logger.debug("%s holds a plain value instead of per-peer subkeys; ignoring it", key)
        return []
    records, _ = parse_model_entries(
        model_name, {subkey: getattr(entry, "value", None) for subkey, entry in found.value.items()}
    )
    return records


def parse_model_entries(model_name: str, entries: Mapping[Any, Any]) -> tuple[list[PeerRecord], int]:
    """The valid records among ``entries`` (subkey -> raw DHT value) of ``model_name``'s key, and
    how many were dropped.

    The one check every reader applies (clients, peers, the dashboard's crawler and its recorded
    snapshots): signature, schema and size, stored under its own peer id, naming this model.
    """
    key = model_key(model_name)
    records = []
    for subkey, value in entries.items():
        record = parse_signed_record(value, expected_peer_id=subkey) if isinstance(subkey, str) else None
        if record is None:
            logger.debug("dropped an invalid record under %s, subkey %r", key, subkey)
        elif record.model_name != model_name:
            logger.debug("dropped %s's record under %s: it names model %r", subkey, key, record.model_name)
        else:
            records.append(record)
    return records, len(entries) - len(records)
