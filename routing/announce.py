"""Keeping a peer's signed record alive in the DHT.

Records expire (``ttl_s``) so a peer that dies without a word drops out of every client's view
on its own; a live peer re-announces every ``period_s``, well inside the ttl, so one lost store
does not make it vanish. Announcing never raises on DHT trouble: a peer keeps serving the
sessions it has even while the DHT is unreachable, and the next period tries again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import hivemind
from hivemind.utils import get_dht_time

from brigade.protocol.identity import Identity
from brigade.protocol.records import (
    MAX_RECORD_TTL_S,
    MODELS_INDEX_KEY,
    IndexEntry,
    PeerRecord,
    PeerState,
    model_key,
    sign,
)

logger = logging.getLogger(__name__)

_JITTER = 0.1  # each sleep is period_s * (1 ± this), so peers started together do not store in lockstep
_MIN_EXPIRATION_STEP = 1e-3  # s; the DHT keeps a subkey's value only if it expires later than the one held
_SIGNING_SLACK_S = 5.0  # s between make_record's signed_at and the expiry set here, at most
MAX_TTL_S = MAX_RECORD_TTL_S - _SIGNING_SLACK_S  # longest ttl_s whose records every DHT node accepts


class Announcer:
    """Keeps this peer's signed record alive in the DHT."""

    def __init__(
        self,
        dht: hivemind.DHT,
        identity: Identity,
        make_record: Callable[[str], PeerRecord],
        *,
        period_s: float = 10.0,
        ttl_s: float = 30.0,
        store_timeout_s: float = 5.0,
    ):
        """``make_record(state)`` builds a fresh record (current throughput, free cache, ...) each
        time, with ``signed_at=get_dht_time()``. ``store_timeout_s`` bounds one store: a store
        still pending at the next period is abandoned rather than piled up. No I/O here."""
        if not 0 < period_s < ttl_s:
            raise ValueError(f"need 0 < period_s < ttl_s, got period_s={period_s}, ttl_s={ttl_s}")
        if ttl_s > MAX_TTL_S:  # DHT nodes would refuse every store (see routing/validator.py)
            raise ValueError(f"ttl_s={ttl_s} is over {MAX_TTL_S:.0f} s, the longest record life DHT nodes accept")
        self._dht = dht
        self._identity = identity
        self._make_record = make_record
        self.period_s = period_s
        self.ttl_s = ttl_s
        self.store_timeout_s = store_timeout_s
        self._state: PeerState = "online"
        self._last_expiration = float("-inf")
        self._rng = random.Random()

    @property
    def state(self) -> PeerState:
        """The state the loop keeps announcing ("leaving" once draining or while moving)."""
        return self._state

    async def announce_once(self, state: str = "online") -> bool:
        """Stores one fresh record with ``state``; True when at least one DHT node accepted it.

        DHT failures and timeouts are logged and return False. A record that cannot be signed
        (it names another identity, or an invalid model name) is a programming error and raises
        ValueError, so that it shows on the first announce rather than hiding in a log.
        """
        record = self._make_record(state)
        if record.state != state:
            raise ValueError(f"make_record({state!r}) returned a record with state {record.state!r}")
        # Strictly increasing expirations: the DHT drops a value for a subkey unless it outlives the
        # held one, so a "leaving" store must never lose to an "online" store made just before it.
        expiration = max(get_dht_time() + self.ttl_s, self._last_expiration + _MIN_EXPIRATION_STEP)
        self._last_expiration = expiration
        # The expiry is signed too: DHT nodes refuse a store that would outlive it (no replays).
        record = record.model_copy(update={"expires_at": expiration})
        value = sign(record, self._identity)
        key = model_key(record.model_name)
        entry = IndexEntry(peer_id=record.peer_id, public_key=record.public_key, model_name=record.model_name,
                           signed_at=record.signed_at, expires_at=expiration)
        try:
            futures = [
                self._dht.store(key, value, expiration, subkey=record.peer_id, return_future=True),
                self._dht.store(MODELS_INDEX_KEY, sign(entry, self._identity), expiration,
                                subkey=record.peer_id, return_future=True),
            ]
            results = await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(future) for future in futures)), self.store_timeout_s
            )
            stored = bool(results[0])
        except TimeoutError:
            logger.warning("announce (%s) of %s timed out after %.1f s", state, key, self.store_timeout_s)
            return False
        except Exception as e:  # the DHT process gone, a broken pipe, an error inside hivemind
            logger.warning("announce (%s) of %s failed: %r", state, key, e)
            return False
        if not stored:
            logger.warning("announce (%s) of %s was accepted by no DHT node", state, key)
            return False
        logger.debug(
            "announced %s as %s for layers %d:%d, expires in %.0f s",
            record.peer_id,
            state,
            record.start_layer,
            record.end_layer,
            self.ttl_s,
        )
        return True

    async def run(self) -> None:
        """Announces until cancelled: every period_s (±10%), with the current state.

        After ``announce_leaving`` the loop keeps re-announcing "leaving", so a drain that lasts
        longer than the ttl still shows clients that this peer takes no new sessions.
        """
        while True:
            await self.announce_once(self._state)
            await asyncio.sleep(self.period_s * self._rng.uniform(1 - _JITTER, 1 + _JITTER))

    async def announce_state(self, state: PeerState) -> bool:
        """Switches the state the loop keeps announcing and stores it now (a moving peer goes
        "leaving" while it reloads, then "online" again); True when a DHT node accepted it."""
        self._state = state
        return await self.announce_once(state)

    async def announce_leaving(self) -> None:
        """Tells clients this peer is draining: one store with state "leaving" (its failure is logged)."""
        self._state = "leaving"
        await self.announce_once("leaving")
