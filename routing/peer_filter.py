"""Allowlist and blocklist of peer ids, for private swarms and for shutting out known bad peers.

One small immutable value used in two places: a DHT node's record validator (a node with an
allowlist stores and serves only its members' records, see ``routing/validator.py``) and the
reading side (``routing/swarm.py``), so a client or the dashboard can filter a public swarm
without running a DHT node of its own configuration. It is picklable because hivemind ships
validators into the DHT's child process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from brigade.protocol.records import PEER_ID_PATTERN, SignedFields

RecordT = TypeVar("RecordT", bound=SignedFields)


@dataclass(frozen=True)
class PeerFilter:
    """Which peer ids to believe. ``allow=None`` admits everyone not blocked; a block always wins."""

    allow: frozenset[str] | None = None  # peer ids admitted; None = any
    block: frozenset[str] = field(default_factory=frozenset)  # peer ids refused, even when allowed

    @classmethod
    def of(cls, allow: Iterable[str] | None = None, block: Iterable[str] = ()) -> PeerFilter:
        """Builds a filter from any iterables; raises ValueError on a string that is no peer id,
        so a typo in a config file shows at start-up instead of silently admitting nobody."""
        allowed = None if allow is None else frozenset(allow)
        blocked = frozenset(block)
        bad = sorted(peer for peer in (allowed or set()) | blocked if not PEER_ID_PATTERN.fullmatch(peer))
        if bad:
            raise ValueError(f"not brigade peer ids: {bad[:5]} (ids look like 'bp' + base58, as peers print them)")
        return cls(allowed, blocked)

    @classmethod
    def from_files(cls, allow_path: str | Path | None = None, block_path: str | Path | None = None) -> PeerFilter:
        """Reads one peer id per line (blank lines and ``#`` comments ignored) from each file given."""
        return cls.of(
            None if allow_path is None else read_peer_ids(allow_path),
            () if block_path is None else read_peer_ids(block_path),
        )

    @property
    def is_open(self) -> bool:
        """True when the filter admits every peer (nothing to check)."""
        return self.allow is None and not self.block

    def admits(self, peer_id: str) -> bool:
        if peer_id in self.block:
            return False
        return self.allow is None or peer_id in self.allow

    def select(self, records: Iterable[RecordT]) -> list[RecordT]:
        """The records whose signer this filter admits, in their order."""
        return [record for record in records if self.admits(record.peer_id)]


def read_peer_ids(path: str | Path) -> list[str]:
    """Peer ids from a text file: one per line, blank lines and ``#`` comments ignored."""
    ids = []
    for line in Path(path).read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            ids.append(text)
    return ids
