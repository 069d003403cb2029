"""Attestation chains: which signature covers each position, and tensors read back checked against them."""

from __future__ import annotations

import torch

from brigade.client.verify.evidence import AttestationChain, badly_signed, first_mismatch
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import attest, tensor_digest
from brigade.protocol.identity import Identity
from brigade.protocol.tensors import encode

PEER = Identity.generate()
LAYERS = (0, 3)


def signed(position: int, inputs: torch.Tensor, outputs: torch.Tensor, step: int = 1,
           identity: Identity = PEER, session: str = "session-1") -> pb.Attestation:
    return attest(identity, session, step, position, LAYERS, tensor_digest(encode(inputs)),
                  tensor_digest(encode(outputs)))


def run(chain: AttestationChain, kept: list[pb.Attestation], x: torch.Tensor, y: torch.Tensor,
        steps: list[tuple[int, int]]) -> None:
    """Feeds steps (start, positions) as a session would: attestations in, then the step's end."""
    for start, positions in steps:
        kept.append(signed(start, x[:, start : start + positions], y[:, start : start + positions]))
        chain.ingest(kept)
        chain.finish_step(start + positions)


def test_prefill_then_decode_tiles_the_session_and_hashes_match() -> None:
    x, y = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    chain, kept = AttestationChain(), []
    run(chain, kept, x, y, [(0, 8), (8, 1), (9, 1), (10, 1), (11, 1)])
    links = chain.covering(0, 12)
    assert [(link.start, link.length) for link in links] == [(0, 8), (8, 1), (9, 1), (10, 1), (11, 1)]
    assert first_mismatch(x, 0, links, "input_sha256", torch.float32) is None
    assert first_mismatch(y, 0, links, "output_sha256", torch.float32) is None
    window = chain.covering(9, 12)
    assert first_mismatch(y[:, 9:], 9, window, "output_sha256", torch.float32) is None
    assert [link.start for link in chain.covering(5, 12)] == [0, 8, 9, 10, 11]  # from the prefill that holds 5
    tampered = y.clone()
    tampered[1, 10, 3] += 1e-3
    assert first_mismatch(tampered, 0, links, "output_sha256", torch.float32) == 10
    assert badly_signed(links, PEER.public_key, PEER.peer_id, "session-1", LAYERS) is None
    assert badly_signed(links, PEER.public_key, PEER.peer_id, "session-2", LAYERS) is links[0]
    assert badly_signed(links, Identity.generate().public_key, PEER.peer_id, "session-1", LAYERS) is links[0]


def test_rollbacks_replace_positions_and_a_partial_one_leaves_them_unattested() -> None:
    x, y = torch.randn(1, 12, 4), torch.randn(1, 12, 4)
    chain, kept = AttestationChain(), []
    run(chain, kept, x, y, [(0, 4), (4, 1), (5, 1), (6, 1)])
    run(chain, kept, x, y, [(5, 1), (6, 1)])  # rolled back to 5 and recomputed: fine
    assert [link.start for link in chain.covering(0, 7)] == [0, 4, 5, 6]
    run(chain, kept, x, y, [(7, 3)])  # three drafted positions
    run(chain, kept, x, y, [(8, 1)])  # two rejected: the 3-position attestation no longer matches
    assert chain.covering(0, 9) is None
    assert chain.covering(0, 7) is not None  # positions before the cut are still attested


def test_chunked_steps_and_replayed_lists_are_read_once() -> None:
    x, y = torch.randn(1, 20, 4), torch.randn(1, 20, 4)
    chain, kept = AttestationChain(), []
    kept += [signed(0, x[:, :8], y[:, :8]), signed(8, x[:, 8:16], y[:, 8:16])]  # one step in two chunks
    chain.ingest(kept)
    chain.ingest(kept)  # nothing new
    chain.finish_step(16)
    assert [(link.start, link.length) for link in chain.covering(0, 16)] == [(0, 8), (8, 8)]
    assert chain.covering(0, 17) is None
