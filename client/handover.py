"""A pushed handover checked on arrival: what the previous hop signed against what the next one vouches for.

With forwarding, a hop's input never passes through the client: the previous hop pushes it and
tells the client (in its own attestation) what it sent. Which bytes did the next hop get? It echoes
the pusher's attestation of the push it received (``StepResult.upstream``, checked on that peer
against the bytes: ``peer/pushes.py``). Comparing the two settles a handover without re-running
anything and without taking either side's word:

- the echo is the pusher's signature for the same session, step, position and layers, but over other
  bytes than it told this client: the pusher signed two outputs for one position and is distrusted;
- the next hop computed the whole push as this one result (it says so: ``upstream_positions``) and
  signed another input than the push it echoes: it contradicts itself and is distrusted (a hop that
  computes a push in chunks signs each chunk's input, which the client cannot match without the bytes);
- no echo, or one the pusher did not sign for this push: nothing is proven either way, and the pair is
  unlinked (the client feeds the next hop itself; ``client/session.py`` ``_blame_pushed``).

Peers announce that they sign and echo pushes (``PeerRecord.vouches_pushes``); a pair with an older
peer is not checked here, so that mixing versions costs no forwarding.
"""

from __future__ import annotations

from brigade.client.hops import HopFailure, HopStream
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import check_attestation
from brigade.protocol.messages import StepAnswer

# (first position, positions, attestation) of each result the previous hop answered for the step
Pushed = list[tuple[int, int, pb.Attestation]]


def check_handover(previous: HopStream, pushed: Pushed, stream: HopStream, answer: StepAnswer) -> None:
    """Raises ``HopFailure`` (for the hop at fault when proven, else for ``stream``) unless the push that
    ``answer`` was computed from is what ``previous`` signed for."""
    if not (previous.hop.peer.vouches_pushes and stream.hop.peer.vouches_pushes):
        return  # a peer of an older version: neither signs nor echoes pushes (its handovers are left to checks)
    echo = answer.upstream
    position = answer.start_position
    if echo is None:
        raise HopFailure(stream.hop, f"it did not vouch for the push its result at position {position} was computed "
                                     "from")
    source = next((entry for entry in pushed if entry[0] <= position < entry[0] + entry[1]), None)
    if source is None:
        raise HopFailure(stream.hop, f"it answered position {position}, which its previous hop did not forward")
    start, _, signed = source
    try:
        valid = echo.peer_id == previous.hop.peer.peer_id and check_attestation(
            echo, bytes.fromhex(previous.hop.peer.public_key))
    except ValueError:
        valid = False
    same_push = (echo.session_id, echo.step_id, echo.start_position, echo.start_layer, echo.end_layer) == (
        signed.session_id, signed.step_id, signed.start_position, signed.start_layer, signed.end_layer)
    if not valid or not same_push:
        raise HopFailure(stream.hop, f"it vouched for another push than its previous hop forwarded at {position}")
    if (echo.input_sha256, echo.output_sha256, echo.rope_sha256) != (
            signed.input_sha256, signed.output_sha256, signed.rope_sha256):
        raise HopFailure(previous.hop, f"it signed two outputs for position {start}: one answered to this client, "
                                       "another pushed to the next hop", lied=True)
    whole_push = position == echo.start_position and answer.positions == answer.upstream_positions
    if whole_push and answer.attestation.input_sha256 != echo.output_sha256:
        raise HopFailure(stream.hop, f"it signed for another input at position {position} than the push it vouched "
                                     "for", lied=True)
