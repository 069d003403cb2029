"""Coverage-guided fuzzing of brigade's decoders with atheris (libFuzzer for Python).

Not a pytest test (no ``test_`` prefix): a separate, open-ended run next to the bounded hypothesis
tests in ``tests/protocol/test_fuzz_decoders.py``. The first input byte picks the target:

  0  ``pb.Tensor`` bytes -> ``protocol.tensors.decode``
  1  ``pb.InferenceRequest`` bytes -> ``decode`` of a step's hidden states
  2  ``pb.ForwardRequest`` bytes -> ``decode``
  3  msgpack bytes -> ``protocol.records.check_signed`` with both schemas, as sent and re-signed
  4  a DHT record (key choice, subkey and value bytes, expiration) -> ``RecordValidator.rejection``
  5  a mutated honest record (``brigade_fuzz.RecordMutator``, seeded from the input) -> the validator
     must refuse it (a replay goes through storage instead, so it is skipped here)
  6  a key file of these bytes -> ``Identity.load_or_create``

A crash is any exception other than the ones each decoder documents, or an accepted mutation.
Inputs are framed as one target byte then the payload; ``--write-seeds DIR`` writes a valid seed
per target, so the fuzzer starts past the parsers' first checks.

Run (atheris is not a project dependency; it ships wheels for CPython 3.11 on Linux x86-64):

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_decoders.py --write-seeds /tmp/brigade-corpus
    .venv/bin/python tests/fuzz/atheris_decoders.py /tmp/brigade-corpus -max_total_time=300 -max_len=8192 \
        -timeout=20 -rss_limit_mb=4096 -artifact_prefix=/tmp/brigade-corpus/

libFuzzer flags apply (``-runs=N``, ``-max_len=8192``, ``-jobs=2``); a crash leaves a ``crash-*`` file
that the same command replays when given as its only argument.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

# Libraries first, uninstrumented (instrumenting torch alone takes minutes); then brigade's code.
import msgpack
import torch  # imported before brigade's code so that it is not instrumented
from google.protobuf.message import DecodeError
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

with atheris.instrument_imports(include=["brigade", "brigade_fuzz"]):
    from brigade_fuzz import RecordMutator, honest_index, honest_peer, sign_fields

    from brigade.protocol import brigade_pb2 as pb
    from brigade.protocol.errors import InvalidTensorError
    from brigade.protocol.identity import Identity
    from brigade.protocol.records import MODELS_INDEX_KEY, IndexEntry, PeerRecord, RecordError, check_signed, model_key
    from brigade.protocol.tensors import TensorLimits, decode
    from brigade.routing.validator import RecordValidator, key_id

LIMITS = TensorLimits(max_bytes=1 << 16, max_rank=3, max_dim=1 << 12)
KEYS = [key_id(model_key("fuzz/model")), key_id(MODELS_INDEX_KEY), key_id(model_key("other"))]
IDENTITIES = [Identity.generate() for _ in range(3)]
SIGNER = IDENTITIES[1]
VALIDATOR = RecordValidator()
KEY_FILE = Path(tempfile.mkdtemp(prefix="brigade-atheris-")) / "peer.key"


def decode_tensor(message: pb.Tensor) -> None:
    try:
        decode(message, LIMITS)
    except InvalidTensorError:
        pass


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    target, payload = data[0] % 7, data[1:]  # plain framing, so that seeds are easy to write
    provider = atheris.FuzzedDataProvider(payload)
    if target <= 2:
        kind = (pb.Tensor, pb.InferenceRequest, pb.ForwardRequest)[target]
        try:
            message = kind.FromString(payload)
        except DecodeError:
            return
        if target == 0:
            decode_tensor(message)
        elif target == 1 and message.WhichOneof("kind") == "step":
            decode_tensor(message.step.hidden)
        elif target == 2:
            decode_tensor(message.hidden)
    elif target == 3:
        try:
            value = msgpack.unpackb(payload, raw=False)
        except Exception:  # not msgpack: nothing reaches the decoder
            return
        values = [value]
        if isinstance(value, dict) and isinstance(value.get("fields"), dict):
            # Re-signed with a real key (its id and key filled in), so the fuzzer reaches the schema
            # and format checks that only run behind a valid signature.
            fields = {**value["fields"], "peer_id": SIGNER.peer_id, "public_key": SIGNER.public_key.hex()}
            try:
                values.append(sign_fields(fields, SIGNER))
            except (TypeError, ValueError, RecursionError):  # not JSON: refused before any signature
                pass
        for candidate in values:
            for schema in (PeerRecord, IndexEntry):
                try:
                    check_signed(candidate, schema)
                except RecordError:
                    pass
    elif target == 4:
        key = KEYS[provider.ConsumeIntInRange(0, len(KEYS) - 1)]
        subkey = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 64))
        expiration = provider.ConsumeFloat()
        record = DHTRecord(key, subkey, provider.ConsumeBytes(provider.remaining_bytes()), expiration)
        assert VALIDATOR.rejection(record, get_dht_time()) is None or True  # must not raise
    elif target == 5:
        now = get_dht_time()
        rng = random.Random(provider.ConsumeBytes(16))
        kind = RecordMutator.KINDS[provider.ConsumeIntInRange(0, len(RecordMutator.KINDS) - 1)]
        if kind == "replay":
            return
        victim = IDENTITIES[rng.randrange(1, len(IDENTITIES))]  # IDENTITIES[0] is the attacker
        honest = honest_index(victim, now) if rng.random() < 0.3 else honest_peer(victim, now, rng)
        older = honest_peer(victim, now, rng, signed_at=now - 1)
        attack = RecordMutator(rng, now, IDENTITIES[:1]).mutate(kind, honest, older)
        reason = VALIDATOR.rejection(attack, now)
        if reason is None:
            raise AssertionError(f"a {kind} attack was accepted: {attack}")
    else:
        KEY_FILE.write_bytes(payload)
        try:
            Identity.load_or_create(KEY_FILE)
        except ValueError:
            pass


def write_seeds(folder: Path) -> None:
    """Valid inputs of each framed target, so the fuzzer starts past the parsers' first checks."""
    from cryptography.hazmat.primitives import serialization

    from brigade.protocol.tensors import encode

    hidden = encode(torch.randn(1, 2, 4))
    now = get_dht_time()
    seeds = {
        0: hidden.SerializeToString(),
        1: pb.InferenceRequest(step=pb.Step(hidden=hidden, start_position=3), session_id="s" * 8).SerializeToString(),
        2: pb.ForwardRequest(start_layer=0, end_layer=2, hidden=hidden).SerializeToString(),
        3: msgpack.packb(honest_peer(SIGNER, now, random.Random(0)).value),
        6: IDENTITIES[0]._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for target, payload in seeds.items():
        (folder / f"seed-{target}").write_bytes(bytes([target]) + payload)
    (folder / "seed-3-index").write_bytes(b"\x03" + msgpack.packb(honest_index(SIGNER, now).value))


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
