"""Coverage-guided fuzzing of brigade's decoders with atheris (libFuzzer for Python).

Not a pytest test (no ``test_`` prefix): a separate, open-ended run next to the bounded hypothesis
tests in ``tests/protocol/test_fuzz_decoders.py``. The first input byte picks the target:

  0  ``pb.Tensor`` bytes -> ``protocol.tensors.decode``
  1  ``pb.InferenceRequest`` bytes -> ``decode`` of a step's hidden states
  2  ``pb.ForwardRequest`` bytes -> ``decode``
  3  msgpack bytes -> ``protocol.records.check_signed`` with both schemas
  4  a DHT record (key choice, subkey and value bytes, expiration) -> ``RecordValidator.rejection``
  5  a mutated honest record (``brigade_fuzz.RecordMutator``, seeded from the input) -> the validator
     must refuse it (a replay goes through storage instead, so it is skipped here)
  6  a key file of these bytes -> ``Identity.load_or_create``

A crash is any exception other than the ones each decoder documents, or an accepted mutation.

Run (atheris is not a project dependency; it ships wheels for CPython 3.11 on Linux x86-64):

    .venv/bin/pip install atheris
    mkdir -p /tmp/brigade-corpus
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
import torch  # noqa: F401  (imported here so that brigade's import of it is not instrumented)
from google.protobuf.message import DecodeError
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

with atheris.instrument_imports(include=["brigade", "brigade_fuzz"]):
    from brigade_fuzz import RecordMutator, honest_index, honest_peer

    from brigade.protocol import brigade_pb2 as pb
    from brigade.protocol.errors import InvalidTensorError
    from brigade.protocol.identity import Identity
    from brigade.protocol.records import MODELS_INDEX_KEY, IndexEntry, PeerRecord, RecordError, check_signed, model_key
    from brigade.protocol.tensors import TensorLimits, decode
    from brigade.routing.validator import RecordValidator, key_id

LIMITS = TensorLimits(max_bytes=1 << 16, max_rank=3, max_dim=1 << 12)
KEYS = [key_id(model_key("fuzz/model")), key_id(MODELS_INDEX_KEY), key_id(model_key("other"))]
IDENTITIES = [Identity.generate() for _ in range(3)]
VALIDATOR = RecordValidator()
KEY_FILE = Path(tempfile.mkdtemp(prefix="brigade-atheris-")) / "peer.key"


def decode_tensor(message: pb.Tensor) -> None:
    try:
        decode(message, LIMITS)
    except InvalidTensorError:
        pass


def fuzz_one(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    target = provider.ConsumeIntInRange(0, 6)
    if target <= 2:
        kind = (pb.Tensor, pb.InferenceRequest, pb.ForwardRequest)[target]
        try:
            message = kind.FromString(provider.ConsumeBytes(provider.remaining_bytes()))
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
            value = msgpack.unpackb(provider.ConsumeBytes(provider.remaining_bytes()), raw=False)
        except Exception:  # not msgpack: nothing reaches the decoder
            return
        for schema in (PeerRecord, IndexEntry):
            try:
                check_signed(value, schema)
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
        KEY_FILE.write_bytes(provider.ConsumeBytes(provider.remaining_bytes()))
        try:
            Identity.load_or_create(KEY_FILE)
        except ValueError:
            pass


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
