"""The DHT record validator, in process: every attack refused, every honest record kept.

Records reach the validator serialized exactly as hivemind's store and find RPCs carry them, and
accepted ones go into hivemind's own ``DHTLocalStorage``, so a replay is judged by the same
"later expiration wins" rule a real node applies. The real-DHT counterpart is
``test_validator_dht.py``.
"""

from __future__ import annotations

import collections
import logging
import pickle
import random
from dataclasses import replace

import pytest
from brigade_fuzz import (
    HONEST_TTL_S,
    Honest,
    RecordMutator,
    dht_record,
    honest_index,
    honest_peer,
    random_peer_id,
    sign_fields,
)
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from brigade.protocol.identity import Identity
from brigade.protocol.records import MAX_RECORD_TTL_S
from brigade.routing.peer_filter import PeerFilter, read_peer_ids
from brigade.routing.validator import MAX_CLOCK_SKEW_S, RecordValidator

logger = logging.getLogger(__name__)

MUTATED_RECORDS = 10_500


class Node:
    """What a DHT node does with a store: validate, then keep the later expiration per subkey."""

    def __init__(self, validator: RecordValidator, now: float):
        self.validator = validator
        self.now = now
        self.storage = DHTLocalStorage()

    def store(self, record) -> str | None:
        """None when stored; else why not ("storage" when hivemind kept a newer value)."""
        reason = self.validator.rejection(record, self.now)
        if reason is not None:
            return reason
        subkey = MSGPackSerializer.loads(record.subkey)
        if not self.storage.store(DHTID.from_bytes(record.key), record.value, record.expiration_time, subkey=subkey):
            return "storage"
        return None

    def held(self, honest: Honest) -> bytes | None:
        found = self.storage.get(DHTID.generate(source=honest.key))
        if found is None or not isinstance(found.value, DictionaryDHTValue):
            return None
        entry = found.value.get(honest.identity.peer_id)
        return None if entry is None else entry.value


@pytest.fixture(scope="module")
def identities() -> list[Identity]:
    return [Identity.generate() for _ in range(48)]


def test_honest_records_of_every_shape_are_accepted(identities: list[Identity]) -> None:
    rng = random.Random(1)
    now = get_dht_time()
    node = Node(RecordValidator(), now)
    client = RecordValidator(check_clock=False)
    for i in range(600):
        identity = identities[i % len(identities)]
        signed_at = now + i * 1e-3  # each newer than the last of the same peer
        honest = honest_index(identity, now, signed_at=signed_at) if i % 5 == 0 else honest_peer(
            identity, now, rng, model=rng.choice(["fuzz/model", "meta-llama/Llama-3.1-8B", "tiny"]), signed_at=signed_at
        )
        record = honest.dht_record()
        assert node.store(record) is None, honest.fields
        assert client.rejection(record, now) is None
    # records signed a little in the future (a clock ahead of ours, within the skew bound) are honest too
    ahead = honest_peer(identities[0], now, signed_at=now + MAX_CLOCK_SKEW_S - 1)
    assert node.validator.rejection(ahead.dht_record(), now) is None


def test_ten_thousand_mutated_records_are_all_refused(identities: list[Identity]) -> None:
    """Each attack kind in turn on a random peer, interleaved with that peer's honest refreshes.

    Counts where each attack was stopped: the validator, or hivemind's storage (a replay of a
    peer's own older record is valid by itself and must lose to the newer one it would replace).
    """
    rng = random.Random(7)
    now = get_dht_time()
    attackers, victims = identities[:8], identities[8:]
    node = Node(RecordValidator(), now)
    mutator = RecordMutator(rng, now, attackers)
    # Each victim's honest history: index entries and peer records, each refresh newer than the last.
    newest: dict[tuple[str, bool], Honest] = {}
    older: dict[tuple[str, bool], Honest] = {}
    honest_refused = honest_stored = 0
    stopped: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def refresh(identity: Identity, index: bool, step: int) -> None:
        nonlocal honest_refused, honest_stored
        slot = (identity.peer_id, index)
        signed_at = now - HONEST_TTL_S / 2 + step * 1e-3
        honest = honest_index(identity, now, signed_at=signed_at) if index else honest_peer(
            identity, now, rng, signed_at=signed_at
        )
        if node.store(honest.dht_record()) is None:
            honest_stored += 1
        else:
            honest_refused += 1
        if slot in newest:
            older[slot] = newest[slot]
        newest[slot] = honest

    for step, victim in enumerate(victims * 2):  # two records per slot, so every replay has an older one
        refresh(victim, False, step)
        refresh(victim, True, step)

    for i in range(MUTATED_RECORDS):
        kind = RecordMutator.KINDS[i % len(RecordMutator.KINDS)]
        slot = (rng.choice(victims).peer_id, rng.random() < 0.3)
        attack = mutator.mutate(kind, newest[slot], older[slot])
        reason = node.store(attack)
        stopped[kind]["accepted" if reason is None else "storage" if reason == "storage" else "validator"] += 1
        if i % 50 == 0:  # honest traffic goes on meanwhile
            identity = next(identity for identity in victims if identity.peer_id == slot[0])
            refresh(identity, slot[1], len(victims) * 2 + i)

    summary = {kind: dict(counts) for kind, counts in stopped.items()}
    logger.info("mutated records stopped: %s; honest stored %d, refused %d", summary, honest_stored, honest_refused)
    assert sum(counts["accepted"] for counts in stopped.values()) == 0, summary
    assert sum(sum(counts.values()) for counts in stopped.values()) >= 10_000
    assert honest_refused == 0 and honest_stored > 2 * len(victims)
    for kind, counts in stopped.items():  # only a byte-for-byte replay is left for storage to stop
        assert counts["storage"] == 0 or kind == "replay", (kind, counts)
    assert stopped["replay"]["storage"] > 0
    # The node still holds each peer's newest honest record, byte for byte.
    for honest in newest.values():
        assert node.held(honest) == honest.dht_record().value


def test_replay_loses_in_storage_and_when_answers_merge(identities: list[Identity]) -> None:
    """hivemind keeps, per subkey, the value with the later expiration: at a store (storage) and
    when a get merges the answers of several nodes (``_SearchState`` merges dictionaries through
    ``DictionaryDHTValue.store``). Signed expiries make the newer record the later one."""
    now = get_dht_time()
    identity = identities[0]
    old = honest_peer(identity, now, signed_at=now - 5).dht_record()
    new = honest_peer(identity, now).dht_record()
    validator = RecordValidator()
    assert validator.rejection(old, now) is None and validator.rejection(new, now) is None
    key = DHTID.from_bytes(new.key)

    for first, second, kept in ((old, new, new), (new, old, new)):
        storage = DHTLocalStorage()
        assert storage.store(key, first.value, first.expiration_time, subkey=identity.peer_id)
        assert storage.store(key, second.value, second.expiration_time, subkey=identity.peer_id) is (second is new)
        assert storage.get(key).value.get(identity.peer_id).value == kept.value

        merged = DictionaryDHTValue()  # two nodes' answers to one get, in either order
        for answer in (first, second):
            merged.store(identity.peer_id, answer.value, answer.expiration_time)
        assert merged.get(identity.peer_id).value == new.value

    stretched = replace(old, expiration_time=new.expiration_time + 1)  # the only way to win: refused
    assert "later than the signed expiry" in validator.rejection(stretched, now)


def test_each_rule_says_why(identities: list[Identity]) -> None:
    now = get_dht_time()
    owner, other = identities[0], identities[1]
    honest = honest_peer(owner, now)
    validator = RecordValidator()

    def refused(record, validator: RecordValidator = validator) -> str:
        reason = validator.rejection(record, now)
        assert reason is not None
        return reason

    assert "subkey is not a peer id" in refused(dht_record(honest.key, None, honest.value, honest.expiration))
    assert "another peer's subkey" in refused(dht_record(honest.key, other.peer_id, honest.value, honest.expiration))
    flipped = {**honest.value, "signature": ("1" if honest.value["signature"][0] == "0" else "0")
               + honest.value["signature"][1:]}
    assert "bad signature" in refused(dht_record(honest.key, owner.peer_id, flipped, honest.expiration))
    assert "not that model's" in refused(dht_record("brigade:model:other", owner.peer_id, honest.value,
                                                    honest.expiration))
    assert "schema" in refused(dht_record(honest.key, owner.peer_id,
                                          sign_fields({**honest.fields, "start_layer": "0"}, owner), honest.expiration))
    assert "over the" in refused(dht_record(honest.key, owner.peer_id, b"\0" * 8000, honest.expiration))

    far = now + MAX_RECORD_TTL_S + MAX_CLOCK_SKEW_S + 10
    far_record = dht_record(honest.key, owner.peer_id,
                            sign_fields({**honest.fields, "signed_at": far - 20, "expires_at": far}, owner), far)
    assert "over the 90-s bound" in refused(far_record)
    # A client-mode node does not check the clock (readers drop such a record one by one instead).
    assert RecordValidator(check_clock=False).rejection(far_record, now) is None
    assert "lives 3600 s" in refused(dht_record(
        honest.key, owner.peer_id, sign_fields({**honest.fields, "expires_at": now + 3600}, owner), now + 3600
    ))


def test_memo_skips_only_the_time_independent_checks(identities: list[Identity]) -> None:
    now = get_dht_time()
    honest = honest_peer(identities[0], now)
    validator = RecordValidator(peer_filter=PeerFilter.of(allow=[identities[0].peer_id]))
    assert validator.rejection(honest.dht_record(), now) is None
    assert validator.rejection(honest.dht_record(), now) is None  # from the memo
    stretched = replace(honest.dht_record(), expiration_time=honest.expiration + 1)
    assert "later than the signed expiry" in validator.rejection(stretched, now)
    assert "over the" in validator.rejection(honest.dht_record(), now - 2 * MAX_RECORD_TTL_S)
    blocked = RecordValidator(peer_filter=PeerFilter.of(block=[identities[0].peer_id]))
    blocked._memo = validator._memo  # a shared memo must not let a blocked peer through
    assert "not admitted" in blocked.rejection(honest.dht_record(), now)


def test_allowlist_and_blocklist(identities: list[Identity], tmp_path) -> None:
    now = get_dht_time()
    member, outsider, banned = identities[:3]
    private = RecordValidator(peer_filter=PeerFilter.of(allow=[member.peer_id, banned.peer_id],
                                                        block=[banned.peer_id]))
    assert private.rejection(honest_peer(member, now).dht_record(), now) is None
    assert private.rejection(honest_index(member, now).dht_record(), now) is None
    for identity in (outsider, banned):
        assert "not admitted" in private.rejection(honest_peer(identity, now).dht_record(), now)
        assert "not admitted" in private.rejection(honest_index(identity, now).dht_record(), now)

    reader = PeerFilter.of(block=[banned.peer_id])
    records = [honest_peer(identity, now) for identity in (member, outsider, banned)]
    assert [record.identity for record in records if reader.admits(record.identity.peer_id)] == [member, outsider]
    assert PeerFilter().is_open and PeerFilter.of(allow=None, block=()).is_open
    with pytest.raises(ValueError, match="not brigade peer ids"):
        PeerFilter.of(allow=["bp-has-dashes"])

    path = tmp_path / "allow.txt"
    path.write_text(f"# the lab's peers\n{member.peer_id}  # gpu box\n\n{outsider.peer_id}\n")
    assert read_peer_ids(path) == [member.peer_id, outsider.peer_id]
    assert PeerFilter.from_files(allow_path=path).allow == {member.peer_id, outsider.peer_id}


def test_validator_survives_pickling_into_the_dht_process(identities: list[Identity]) -> None:
    now = get_dht_time()
    validator = RecordValidator(peer_filter=PeerFilter.of(allow=[identities[0].peer_id]), check_clock=False)
    honest = honest_peer(identities[0], now).dht_record()
    assert validator.validate(honest)
    copy = pickle.loads(pickle.dumps(validator))
    assert copy._memo == {} and copy.check_clock is False and copy.peer_filter == validator.peer_filter
    assert copy.validate(honest)
    assert not copy.validate(honest_peer(identities[1], now).dht_record())


def test_validate_never_raises(identities: list[Identity], caplog: pytest.LogCaptureFixture) -> None:
    honest = honest_peer(identities[0], get_dht_time()).dht_record()
    validator = RecordValidator()
    with caplog.at_level(logging.DEBUG, logger="brigade.routing.validator"):
        assert validator.validate(replace(honest, value=None)) is False  # not even bytes: a bug's stand-in
        assert validator.validate(replace(honest, subkey=random_peer_id(random.Random(0)).encode())) is False
    assert "validator failed" in caplog.text and "refused a DHT record" in caplog.text
