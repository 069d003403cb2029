"""What a hop signed, position by position, and whether tensors read back match it.

Every result a peer returns carries a signed attestation (``protocol/attestation.py``) over the
hashes of the input it received and the output it produced. Kept per hop in the order they
arrived, they say which bytes the peer claims for every position of its session: a step at
position ``p`` replaces whatever the peer held from ``p`` on (it rolled its cache back first), so
the newest attestations form a chain over positions ``[0, length)``. A result check reads tensors
back from peers (``History``) and binds them to that chain before trusting them: a peer cannot
hand a check different bytes from those it signed for, and a wrong result it signed for is
evidence against it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import check_attestation, tensor_digest
from brigade.protocol.tensors import encode


@dataclass
class Link:
    """One attestation and the positions ``[start, start + length)`` it covers."""

    attestation: pb.Attestation
    length: int | None = None  # known once the next attestation or the step's end is seen
    truncated: bool = False  # a later rollback cut into it: its hashes no longer describe what the peer holds

    @property
    def start(self) -> int:
        return self.attestation.start_position

    @property
    def end(self) -> int:
        assert self.length is not None, "lengths are set at every completed step"
        return self.start + self.length


class AttestationChain:
    """The attestations that describe one hop's session now, ordered by position."""

    def __init__(self) -> None:
        self.links: list[Link] = []
        self._last_seen: pb.Attestation | None = None

    def ingest(self, attestations: list[pb.Attestation]) -> None:
        """Adds the attestations of ``attestations`` (a hop's list, newest last) not seen yet."""
        fresh = []
        for attestation in reversed(attestations):
            if attestation is self._last_seen:
                break
            fresh.append(attestation)
        for attestation in reversed(fresh):
            self.add(attestation)
        if attestations:
            self._last_seen = attestations[-1]

    def add(self, attestation: pb.Attestation) -> None:
        position = attestation.start_position
        while self.links and self.links[-1].start >= position:
            self.links.pop()  # rolled back: the peer recomputed from ``position`` on
        if self.links:
            last = self.links[-1]
            if last.length is None:
                last.length = position - last.start
            elif last.end > position:
                last.truncated = True  # a step of several positions, partly rolled back
        self.links.append(Link(attestation))

    def finish_step(self, length: int) -> None:
        """The session is ``length`` positions long now: the last attestation ends there."""
        if self.links and self.links[-1].length is None:
            self.links[-1].length = max(0, length - self.links[-1].start)

    def covering(self, start: int, end: int) -> list[Link] | None:
        """Links that exactly tile ``[start', end)`` for the largest ``start' <= start`` a link begins
        at; None when some position is not attested (or only by a truncated link)."""
        chosen = [link for link in self.links if link.length is not None and link.start < end and link.end > start]
        if not chosen or chosen[0].start > start or chosen[-1].end != end:
            return None
        for before, after in itertools.pairwise(chosen):
            if before.end != after.start:
                return None
        if any(link.truncated for link in chosen):
            return None
        return chosen


def first_mismatch(tensor: torch.Tensor, offset: int, links: list[Link], field: str, wire: torch.dtype) -> int | None:
    """The first position whose signed ``field`` hash ("input_sha256" or "output_sha256") does not
    match ``tensor`` (positions ``[offset, offset + T)`` of ``[B, T, H]``); None when all match.

    Hashes are over the wire encoding, which both ends compute from the same values: re-encoding
    a slice in the wire dtype gives the bytes the peer hashed.
    """
    for link in links:
        piece = tensor[:, link.start - offset : link.end - offset]
        if piece.shape[1] != link.length or tensor_digest(encode(piece, wire)) != getattr(link.attestation, field):
            return link.start
    return None


def badly_signed(links: list[Link], public_key: bytes, peer_id: str, session_id: str,
                 layers: tuple[int, int]) -> Link | None:
    """The first link not signed by that peer for that session and those layers; None if all are."""
    for link in links:
        att = link.attestation
        if (att.peer_id != peer_id or att.session_id != session_id
                or (att.start_layer, att.end_layer) != layers or not check_attestation(att, public_key)):
            return link
    return None
