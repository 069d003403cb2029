"""Crawling the whole swarm: every model named in the models index, and every model's peer records.

A crawler reads raw DHT values through a ``SwarmSource``: the live DHT (``DHTSource``) or a
recorded snapshot of it (``SnapshotSource``, a JSON file of ``{key: {subkey: value}}``), so a
recorded or simulated swarm of thousands of peers goes through exactly the parsing that live
records do (``parse_signed`` for index entries, ``swarm.parse_model_entries`` for peer records).

Unlike ``fetch_records``, which reads a DHT that does not answer as an empty swarm (right for a
client, which then names the missing layers), a crawl tells failure from emptiness: a source that
does not answer raises ``CrawlError``, and the caller shows that the crawl failed instead of a
swarm that seems to have vanished. Bad values are still dropped and counted, never raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from brigade.protocol.records import MODELS_INDEX_KEY, IndexEntry, PeerRecord, model_key, parse_signed
from brigade.routing.swarm import parse_model_entries

logger = logging.getLogger(__name__)

MAX_MODELS = 256  # models one crawl reads; the rest are reported as skipped (an index flooded with junk names)
MAX_SNAPSHOT_BYTES = 256 * 1024 * 1024
MAX_ENTRIES_PER_KEY = 20_000  # subkeys parsed per key; beyond that they count as dropped (a flooded key)


class CrawlError(RuntimeError):
    """The source did not answer (timeout, DHT process gone, unreadable snapshot)."""


class SwarmSource(Protocol):
    """Where raw DHT values come from. ``start`` does the I/O of joining; ``close`` never raises."""

    description: str

    async def start(self) -> None: ...

    async def get_subkeys(self, key: str) -> dict[Any, Any]:
        """``{subkey: raw value}`` under ``key`` ({} when nothing is stored); CrawlError when unanswered."""
        ...

    def close(self) -> None: ...


class DHTSource:
    """The live swarm, read through a client-mode hivemind node that this source starts and owns."""

    def __init__(self, initial_peers: Sequence[str], *, get_timeout_s: float = 10.0, startup_timeout_s: float = 30.0):
        if not initial_peers:
            raise ValueError("a DHT source needs at least one initial peer (--initial-peers)")
        self.initial_peers = list(initial_peers)
        self.get_timeout_s = get_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.description = f"DHT via {', '.join(self.initial_peers)}"
        self._dht: Any = None

    async def start(self) -> None:
        from brigade.routing.dht import start_dht

        if self._dht is None:
            # Client mode: the dashboard only reads; it must never hold records for others.
            self._dht = await asyncio.to_thread(
                start_dht, self.initial_peers, client_mode=True, startup_timeout_s=self.startup_timeout_s
            )

    async def get_subkeys(self, key: str) -> dict[Any, Any]:
        if self._dht is None:
            raise CrawlError("the DHT node is not started")
        try:
            future = self._dht.get(key, latest=True, return_future=True)
            found = await asyncio.wait_for(asyncio.wrap_future(future), self.get_timeout_s)
        except TimeoutError as e:
            raise CrawlError(f"reading {key} from the DHT timed out after {self.get_timeout_s:.1f} s") from e
        except Exception as e:  # the DHT process gone, a broken pipe, an error inside hivemind
            raise CrawlError(f"reading {key} from the DHT failed: {e!r}") from e
        if found is None:
            return {}
        if not isinstance(found.value, dict):
            logger.debug("%s holds a plain value instead of per-peer subkeys; ignoring it", key)
            return {}
        return {subkey: getattr(entry, "value", None) for subkey, entry in found.value.items()}

    def close(self) -> None:
        if self._dht is not None:
            dht, self._dht = self._dht, None
            try:
                dht.shutdown()
            except Exception:  # shutting down a node whose process already died
                logger.debug("DHT shutdown failed", exc_info=True)


class SnapshotSource:
    """A recorded view of the DHT: a JSON object ``{key: {subkey: signed value}}``.

    The file is read again on every crawl (in a thread), so it can be replaced while a dashboard
    runs. For offline inspection (``brigade swarm status --save-snapshot``) and for large simulated
    swarms in tests: the values are signed records like any others and are checked the same way.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.description = f"snapshot {self.path}"
        self._loaded: tuple[float, dict[str, Any]] | None = None

    async def start(self) -> None:
        await self._load()

    async def _load(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime
            if self._loaded is None or self._loaded[0] != mtime:
                self._loaded = (mtime, await asyncio.to_thread(_read_snapshot, self.path))
        except (OSError, ValueError) as e:
            raise CrawlError(f"cannot read the snapshot {self.path}: {e}") from e
        return self._loaded[1]

    async def get_subkeys(self, key: str) -> dict[Any, Any]:
        value = (await self._load()).get(key)
        return dict(value) if isinstance(value, dict) else {}

    def close(self) -> None:
        self._loaded = None


def _read_snapshot(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_SNAPSHOT_BYTES:
        raise ValueError(f"larger than {MAX_SNAPSHOT_BYTES} bytes")
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object of {key: {subkey: value}}")
    return data


@dataclass(frozen=True)
class ModelRecords:
    """One model's valid records, as read by one crawl."""

    name: str
    records: list[PeerRecord]
    dropped: int = 0  # values under the model's key that failed validation
    error: str = ""  # the source did not answer for this model (its records are then unknown, not empty)


@dataclass
class SwarmCrawl:
    """Everything one crawl read. ``raw`` keeps the values as read, to save as a snapshot."""

    started_at: float  # wall-clock time (DHT time) the crawl began
    models: dict[str, ModelRecords] = field(default_factory=dict)
    index_entries: int = 0  # valid entries in the models index
    index_dropped: int = 0  # index values that failed validation
    models_skipped: int = 0  # models beyond MAX_MODELS
    raw: dict[str, dict[Any, Any]] = field(default_factory=dict)

    @property
    def records_seen(self) -> int:
        return sum(len(model.records) for model in self.models.values())

    @property
    def records_dropped(self) -> int:
        return self.index_dropped + sum(model.dropped for model in self.models.values())


def _bounded(entries: Mapping[Any, Any]) -> tuple[dict[Any, Any], int]:
    """At most MAX_ENTRIES_PER_KEY of ``entries``, and how many were left out."""
    if len(entries) <= MAX_ENTRIES_PER_KEY:
        return dict(entries), 0
    kept = dict(list(entries.items())[:MAX_ENTRIES_PER_KEY])
    logger.warning("a key holds %d subkeys; reading the first %d", len(entries), MAX_ENTRIES_PER_KEY)
    return kept, len(entries) - MAX_ENTRIES_PER_KEY


def parse_index(entries: Mapping[Any, Any]) -> tuple[dict[str, int], int]:
    """Model name -> number of valid index entries naming it, and how many entries were dropped."""
    counts: dict[str, int] = {}
    entries, dropped = _bounded(entries)
    for subkey, value in entries.items():
        entry = parse_signed(value, IndexEntry, expected_peer_id=subkey) if isinstance(subkey, str) else None
        if entry is not None:
            try:
                model_key(entry.model_name)
            except ValueError:
                entry = None
        if entry is None:
            dropped += 1
            logger.debug("dropped an invalid models index entry under subkey %r", subkey)
            continue
        counts[entry.model_name] = counts.get(entry.model_name, 0) + 1
    return counts, dropped


async def crawl(
    source: SwarmSource, *, concurrency: int = 8, max_models: int = MAX_MODELS, keep_raw: bool = False
) -> SwarmCrawl:
    """Reads the models index, then every listed model's records (``concurrency`` reads at a time).

    Raises CrawlError when the index cannot be read; a model whose own read fails is kept with its
    ``error`` set. Parsing (a signature check per record) runs in a worker thread so that a large
    swarm does not stall the caller's event loop.
    """
    started = time.time()
    index_raw = await source.get_subkeys(MODELS_INDEX_KEY)
    counts, index_dropped = await asyncio.to_thread(parse_index, index_raw)
    names = sorted(counts, key=lambda name: (-counts[name], name))
    result = SwarmCrawl(started_at=started, index_entries=sum(counts.values()), index_dropped=index_dropped,
                        models_skipped=max(0, len(names) - max_models))
    if keep_raw:
        result.raw[MODELS_INDEX_KEY] = index_raw
    if result.models_skipped:
        logger.warning("the models index names %d models; reading the %d with most peers", len(names), max_models)
    semaphore = asyncio.Semaphore(max(1, concurrency))

    async def read(name: str) -> ModelRecords:
        async with semaphore:
            try:
                raw = await source.get_subkeys(model_key(name))
            except CrawlError as e:
                return ModelRecords(name, [], error=str(e))
            if keep_raw:
                result.raw[model_key(name)] = raw
            kept, left_out = _bounded(raw)
            records, dropped = await asyncio.to_thread(parse_model_entries, name, kept)
            return ModelRecords(name, records, dropped + left_out)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(read(name), name=f"crawl {name}") for name in sorted(names[:max_models])]
    for task in tasks:
        model = task.result()
        result.models[model.name] = model
    return result


def save_snapshot(crawl_result: SwarmCrawl, path: str | Path) -> None:
    """Writes the raw values a crawl read (``crawl(..., keep_raw=True)``) as a SnapshotSource file."""
    Path(path).write_text(json.dumps(crawl_result.raw, default=_jsonable))


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot save a {type(value).__name__} in a snapshot")
