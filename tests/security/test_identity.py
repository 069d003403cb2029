"""Identities on real processes: the key lives in a 0600 file created on first run, and the peer id
every part of the swarm sees derives from that key.

- The guard peer was started with ``--identity <file>`` naming a file that did not exist: it created
  it with mode 0600, its ready line, its signed DHT record and its TLS certificate's record all
  carry the id derived from that key, and the record's public key is the file's.
- A client's ``ClientConfig.identity_path`` works the same way, and the id a peer counts its
  sessions under (and names when it refuses one) is that file's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest
from brigade_peer_client import open_session, peer_stub
from brigade_security import SecuritySwarm

from brigade.protocol.identity import Identity, peer_id_of
from brigade.protocol.tls import spki_sha256

pytestmark = pytest.mark.timeout(120)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_peer_creates_its_key_file_0600_and_is_known_by_the_id_it_derives(security_swarm: SecuritySwarm) -> None:
    key_file = security_swarm.guard_key
    assert mode_of(key_file) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    identity = Identity.load_or_create(key_file)  # the file exists: this reads it, creates nothing
    assert identity.peer_id == peer_id_of(identity.public_key)
    assert security_swarm.peer_id(security_swarm.guard) == identity.peer_id

    _, records = security_swarm.read_records()
    guard = [record for record in records if record.address == security_swarm.guard.info["address"]]
    assert len(guard) == 1, records
    record = guard[0]
    assert record.peer_id == identity.peer_id and record.public_key == identity.public_key.hex()
    assert record.tls_cert == security_swarm.guard.info["tls_cert"]
    assert record.tls_spki_sha256 == spki_sha256(record.tls_cert)
    others = {security_swarm.peer_id(security_swarm.twin), security_swarm.peer_id(security_swarm.plain)}
    assert identity.peer_id not in others  # the other peers (fresh keys) have ids of their own


def test_a_client_key_file_is_0600_and_its_id_is_the_one_peers_count(security_swarm: SecuritySwarm,
                                                                    tmp_path: Path) -> None:
    key_file = tmp_path / "client" / "me.key"
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        swarm, _ = security_swarm.read_records(identity_path=str(key_file))
    finally:
        os.umask(old_umask)
    assert mode_of(key_file) == 0o600
    assert swarm.identity.peer_id == Identity.load_or_create(key_file).peer_id
    again, _ = security_swarm.read_records(identity_path=str(key_file))
    assert again.identity.peer_id == swarm.identity.peer_id  # a restart keeps the id

    # The guard refuses a session over one client's cache share (20 pages, its share is 16),
    # naming the client by that id.
    channel, stub = peer_stub(security_swarm.guard.info)
    try:
        request = open_session(security_swarm.guard.info, "identity-too-big", identity=swarm.identity,
                               start_layer=0, end_layer=6, batch_size=20, max_length=64)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Inference(iter([request]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"client {swarm.identity.peer_id} would hold" in (caught.value.details() or "")
    finally:
        channel.close()
