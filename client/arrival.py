"""Every attestation checked the moment it arrives, before the client keeps it as evidence.

Result checks (``client/verify/``) bind what they read back to the chain of a hop's attestations.
A chain built from unchecked attestations lets a peer dodge every check at no cost: one signed at
a shifted or absurd position, for another session or other layers, leaves the checked positions
"unattested", and the check is skipped. So each one is checked on arrival against what this client
knows it asked for: the peer's key, the hop's session id and layers, the position the result
covers, and (when the result carries tensors) the digest of those tensors. One that fails is a
hop failure like any other wrong answer; one validly signed for something other than what it
answers is a signed lie, and the peer is distrusted (``HopFailure.lied``).
"""

from __future__ import annotations

from brigade.client.hops import HopFailure, HopStream
from brigade.protocol.attestation import check_attestation
from brigade.protocol.messages import StepAnswer


def check_on_arrival(stream: HopStream, answer: StepAnswer) -> None:
    """Raises ``HopFailure`` unless ``answer``'s attestation is the hop's own signature over exactly it."""
    att = answer.attestation
    hop = stream.hop
    if att is None or not att.signature:
        raise HopFailure(hop, "answered without an attestation")
    try:
        public_key = bytes.fromhex(hop.peer.public_key)
    except ValueError as error:
        raise HopFailure(hop, "its record's public key is not hex") from error
    if att.peer_id != hop.peer.peer_id or not check_attestation(att, public_key):
        raise HopFailure(hop, "its attestation is not validly signed by it")  # not provably its own: a ban only
    wrong = []
    if att.session_id != stream.session_id:
        wrong.append(f"session {att.session_id!r}")
    if (att.start_layer, att.end_layer) != (hop.start, hop.end):
        wrong.append(f"layers {att.start_layer}:{att.end_layer}")
    if att.step_id != answer.step_id:
        wrong.append(f"step {att.step_id} for a result of step {answer.step_id}")
    if att.start_position != answer.start_position:
        wrong.append(f"position {att.start_position} for a result at {answer.start_position}")
    if answer.hidden is not None and att.output_sha256 != answer.hidden.digest:
        wrong.append("an output other than the one it returned")
    if wrong:
        raise HopFailure(hop, f"it signed for {', '.join(wrong)}", lied=True)
