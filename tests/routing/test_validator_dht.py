"""The validator in real hivemind DHT nodes on 127.0.0.1: attacks sent over the wire are refused,
honest records are kept and read back.

The attacker is a plain hivemind node without brigade's validator (anyone can run one and join).
It sends each attack straight to each brigade node with the DHT's own store RPC, so every node's
answer is checked one by one, and it also stores junk through the ordinary ``DHT.store``, which
keeps the junk in its own storage: a reader's get then meets an answer with junk in it, and its
own validator must drop that answer while the honest nodes' answers still come through.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import hivemind
import pytest
from brigade_fuzz import FUZZ_MODEL, HONEST_TTL_S, RecordMutator, dht_record, honest_peer, sign_fields
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, model_key
from brigade.routing.announce import Announcer
from brigade.routing.dht import DEFAULT_LISTEN, start_dht, visible_maddrs
from brigade.routing.peer_filter import PeerFilter
from brigade.routing.swarm import fetch_index, fetch_records

pytestmark = pytest.mark.timeout(120)

MEMBER = Identity.generate()  # the one peer the private node admits


@dataclass
class Swarm:
    bootstrap: hivemind.DHT
    peer: hivemind.DHT
    client: hivemind.DHT  # client mode
    private: hivemind.DHT  # allowlist: MEMBER only
    attacker: hivemind.DHT  # plain hivemind, no validator

    @property
    def brigade_nodes(self) -> list[hivemind.DHT]:
        return [self.bootstrap, self.peer, self.private]


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    started: list[hivemind.DHT] = []
    try:
        started.append(start_dht())
        initial = visible_maddrs(started[0])
        started.append(start_dht(initial))
        started.append(start_dht(initial, client_mode=True))
        started.append(start_dht(initial, peer_filter=PeerFilter.of(allow=[MEMBER.peer_id])))
        started.append(hivemind.DHT(initial_peers=initial, host_maddrs=list(DEFAULT_LISTEN), start=True))
        yield Swarm(*started)
    finally:
        for dht in reversed(started):
            dht.shutdown()


async def _send_stores(_dht: hivemind.DHT, node, target: PeerID, records: list[DHTRecord]) -> list[bool] | None:
    """Runs in the attacker's DHT process: one store RPC carrying ``records`` to ``target``."""
    subkeys = [MSGPackSerializer.loads(record.subkey) for record in records]  # call_store serializes them again
    store_ok = await node.protocol.call_store(
        target, keys=[DHTID.from_bytes(record.key) for record in records], values=[record.value for record in records],
        expiration_time=[record.expiration_time for record in records], subkeys=subkeys,
    )
    return None if store_ok is None else list(store_ok)  # a protobuf field does not pickle


def send_stores(swarm: Swarm, target: hivemind.DHT, records: list[DHTRecord]) -> list[bool]:
    """Each record in its own store RPC from the attacker to ``target``; the node's answer to each.

    One at a time because hivemind's pipe into its DHT process fails on payloads over ~64 KiB.
    """
    answers = []
    for record in records:
        future = swarm.attacker.run_coroutine(partial(_send_stores, target=target.peer_id, records=[record]),
                                              return_future=True)
        answer = future.result(timeout=30)
        assert answer is not None, "the node did not answer the store RPC"
        answers.extend(answer)
    return answers


def make_record(identity: Identity, state: str) -> PeerRecord:
    return PeerRecord(peer_id=identity.peer_id, public_key=identity.public_key.hex(), address="127.0.0.1:5000",
                      model_name=FUZZ_MODEL, start_layer=0, end_layer=4, num_layers=8, dtype="float32",
                      state=state, signed_at=get_dht_time())


def test_attacks_over_the_wire_are_refused_and_honest_records_kept(swarm: Swarm) -> None:
    honest_ids = [MEMBER, Identity.generate()]
    for identity in honest_ids:  # the real announce path first
        announcer = Announcer(swarm.peer, identity, partial(make_record, identity), ttl_s=HONEST_TTL_S)
        # hivemind's store reports the answer of whichever replica answered last, and the private
        # node refuses the second peer: only MEMBER's announce is accepted by every node.
        assert asyncio.run(announcer.announce_once()) or identity is not MEMBER
        assert asyncio.run(announcer.announce_once("leaving")) or identity is not MEMBER

    # Newer records sent to every node, so that each holds exactly these and a replay is older.
    now = get_dht_time()
    current = {identity.peer_id: honest_peer(identity, now, signed_at=now) for identity in honest_ids}
    older = {identity.peer_id: honest_peer(identity, now, signed_at=now - 1) for identity in honest_ids}
    records = [honest.dht_record() for honest in current.values()]
    for node in swarm.brigade_nodes:
        assert send_stores(swarm, node, records) == ([True, False] if node is swarm.private else [True, True])

    mutator = RecordMutator(random.Random(5), now, [Identity.generate()])
    attacks = []
    for kind in RecordMutator.KINDS:
        for identity in honest_ids:
            attack = mutator.mutate(kind, current[identity.peer_id], older[identity.peer_id])
            if len(attack.key) == 20:  # the store RPC carries DHT ids only
                attacks.append(attack)
    assert len(attacks) >= 25
    for node in swarm.brigade_nodes:
        assert send_stores(swarm, node, attacks) == [False] * len(attacks)

    # A still newer honest record is accepted whoever relays it, and wins when answers merge.
    later = get_dht_time() + 0.5
    fresh = [honest_peer(identity, later, address="127.0.0.1:6000").dht_record() for identity in honest_ids]
    assert send_stores(swarm, swarm.bootstrap, fresh) == [True, True]

    # Junk stored the ordinary way stays in the attacker's own storage and comes back in its answers.
    for attack in attacks[:12]:
        if attack.subkey != b"\xc0":
            swarm.attacker.store(model_key(FUZZ_MODEL), attack.value, attack.expiration_time,
                                 subkey=MSGPackSerializer.loads(attack.subkey))
    unvalidated = swarm.attacker.get(model_key(FUZZ_MODEL), latest=True)  # what a node without the validator sees
    assert len(unvalidated.value) > len(honest_ids)
    read = asyncio.run(fetch_records(swarm.client, FUZZ_MODEL))
    assert sorted(record.peer_id for record in read) == sorted(identity.peer_id for identity in honest_ids)
    assert {record.address for record in read} == {"127.0.0.1:6000"}  # the fresh ones
    index = asyncio.run(fetch_index(swarm.client))
    assert {entry.peer_id for entry in index} >= {identity.peer_id for identity in honest_ids}
    members = asyncio.run(fetch_records(swarm.client, FUZZ_MODEL, peer_filter=PeerFilter.of(allow=[MEMBER.peer_id])))
    assert [record.peer_id for record in members] == [MEMBER.peer_id]



SQUAT_MODEL = "fuzz/squatted"
YEAR_S = 365 * 24 * 3600.0


def test_far_future_squatting_cannot_shadow_or_outlive_an_honest_peer(swarm: Swarm) -> None:
    """Petals' hole: an unsigned entry with a far-future expiry overwrites a peer's slot for good.

    Here a squatter tries it four ways on an honest peer's slot (a record in the victim's subkey
    signed with its own key, the victim's own record with its expiration stretched a year, a plain
    value over the whole key, its own record living a year): every brigade node refuses each over
    the store RPC, a client reading through all the nodes (the attacker's own storage included)
    still sees exactly the victim's honest record, and once the victim stops refreshing it the slot
    is empty: nothing keeps it alive.
    """
    victim, squatter = Identity.generate(), Identity.generate()
    now = get_dht_time()
    honest = honest_peer(victim, now, model=SQUAT_MODEL, ttl_s=4.0)
    for node in (swarm.bootstrap, swarm.peer):
        assert send_stores(swarm, node, [honest.dht_record()]) == [True]

    far = now + YEAR_S
    in_victims_slot = {**honest.fields, "address": "127.0.0.1:6666", "public_key": squatter.public_key.hex(),
                       "signed_at": far - HONEST_TTL_S, "expires_at": far}
    own = honest_peer(squatter, now, model=SQUAT_MODEL, address="127.0.0.1:6666")
    own_fields = {**own.fields, "signed_at": far - HONEST_TTL_S, "expires_at": far}
    plain = {"fields": own_fields, "signature": "00" * 64}
    squats = [
        (victim.peer_id, sign_fields(in_victims_slot, squatter)),
        (victim.peer_id, honest.value),  # the victim's own signed bytes, kept for a year
        (None, plain),
        (squatter.peer_id, sign_fields(own_fields, squatter)),
    ]
    records = [dht_record(model_key(SQUAT_MODEL), subkey, value, far) for subkey, value in squats]
    for node in swarm.brigade_nodes:
        assert send_stores(swarm, node, records) == [False] * len(records)
    for subkey, value in squats:  # kept in the attacker's own storage, and offered to its neighbours
        if subkey is None:
            swarm.attacker.store(model_key(SQUAT_MODEL), value, far)
        else:
            swarm.attacker.store(model_key(SQUAT_MODEL), value, far, subkey=subkey)
    unvalidated = swarm.attacker.get(model_key(SQUAT_MODEL), latest=True)  # a node without the validator
    assert unvalidated is not None and unvalidated.expiration_time >= far  # the squat is in the swarm

    read = asyncio.run(fetch_records(swarm.client, SQUAT_MODEL))
    assert [(record.peer_id, record.address) for record in read] == [(victim.peer_id, "127.0.0.1:5000")]

    time.sleep(max(0.0, honest.expiration - get_dht_time()) + 0.5)
    assert asyncio.run(fetch_records(swarm.client, SQUAT_MODEL)) == []
