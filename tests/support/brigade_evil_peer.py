"""A cheating peer for result-verification tests: the real ``brigade`` peer, computing wrongly.

    python tests/support/brigade_evil_peer.py --cheat noise:0.2 peer run MODEL --layers 3:6 ...

It is the real peer process (same server, records, TLS, tokens, forwarding, History) with one
change in its compute: ``noise:S`` adds Gaussian noise of standard deviation ``S`` times the RMS
of what its span added to each position (so ``S`` is the error relative to the span's work);
``skip:K`` leaves out the ``K``-th layer of its span (0-based). It signs what it returns like an
honest peer, so only a re-run elsewhere can tell. ``lie:S`` computes honestly but hands back its
kept outputs (``History``, what a check reads) with noise of ``S`` times their RMS: what a peer
would do to make a check compare something other than what it sent. ``rope:K`` computes and signs
honestly but forwards rope lengths (``Step.rope_lengths``) off by ``K``, so that the next hop computes
wrongly. ``refuse:invalid`` / ``refuse:range`` answers every step with INVALID_ARGUMENT / OUT_OF_RANGE
(a request's own fault, which it is not); ``crash:`` fails every pass as an out-of-memory would;
``short-history:K`` returns K positions fewer than asked from ``History``.
``shift-attestation:K`` computes honestly but signs every result at its position plus ``K`` (a chain
that covers nothing the client asks about: what dodged every check before attestations were
checked on arrival). ``refuse-history:`` computes honestly but refuses every ``History`` read
(a check it dodged counted as skipped). ``frame-upstream:`` computes honestly but signs a wrong
hash of the input it received: a free identity that says its honest upstream neighbour pushed it
other bytes than that neighbour signed for. ``no-push:`` computes and signs honestly and answers its
steps "forwarded", but never pushes them: its honest next hop waits for inputs that never come.
``push-other:S`` computes and signs honestly for its client, but pushes its next hop outputs with
noise of ``S`` times their RMS, with a valid attestation of those other bytes (two signed outputs for
one position); ``push-unsigned:S`` pushes the same noisy bytes with the honest attestation (which the
next hop finds does not match them). Either way its honest next hop computes right from what it got,
which is what a re-run from the pusher's signed outputs would call wrong. ``made-up-step:P``
computes, signs and pushes honestly, then after its first one-position push at position ``P`` or
later makes up a newer step (step id + 1) over every position so far: random hidden states at the
RMS of its outputs, validly signed, the client's tickets copied. Its next hop's cache is rewritten
under a result the client cannot use, and the client's real next step continues where it ends.
``strip-tickets:`` computes, signs and pushes honestly but drops the client's tickets from every
push: its next hop refuses each one.
``LocalSwarm.add_peer(entry=evil_entry(...))`` starts one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from brigade.cli import app  # LocalSwarm sets the OpenMP wait policy in the environment before torch loads
from brigade.peer.executor import SpanExecutor
from brigade.peer.outputs import OutputHistory


def evil_entry(cheat: str) -> tuple[str, ...]:
    """``LocalSwarm.add_peer``'s ``entry`` for a peer that cheats with ``cheat`` ("noise:S", "skip:K", "lie:S")."""
    return (str(Path(__file__).resolve()), "--cheat", cheat)


class _Skipped(nn.Module):
    """A decoder layer that does nothing: its position's output is its input."""

    def forward(self, hidden: torch.Tensor, *args: object) -> torch.Tensor:
        return hidden


def _add_noise(scale: float) -> None:
    honest_forward = SpanExecutor._forward

    def noisy_forward(self: SpanExecutor, plan: list) -> list[torch.Tensor]:
        outputs = honest_forward(self, plan)
        noisy = []
        for (item, positions), output in zip(plan, outputs, strict=True):
            inputs = item.hidden[:, item.done : item.done + positions].to(output.dtype)
            added_rms = (output - inputs).pow(2).mean(dim=-1, keepdim=True).sqrt()  # [B, T, 1]
            noisy.append(output + scale * added_rms * torch.randn_like(output))
        return noisy

    SpanExecutor._forward = noisy_forward  # type: ignore[method-assign]


def _skip_layer(offset: int) -> None:
    honest_init = SpanExecutor.__init__

    def init_without_a_layer(self: SpanExecutor, span: nn.Module, *args: object, **kwargs: object) -> None:
        span.layers[offset] = _Skipped()  # type: ignore[index]
        honest_init(self, span, *args, **kwargs)  # type: ignore[arg-type]

    SpanExecutor.__init__ = init_without_a_layer  # type: ignore[method-assign]


def _lie_about_history(scale: float) -> None:
    honest_read = OutputHistory.read

    def lying_read(self: OutputHistory, start: int, end: int) -> torch.Tensor:
        kept = honest_read(self, start, end)
        return kept + scale * kept.pow(2).mean().sqrt() * torch.randn_like(kept)

    OutputHistory.read = lying_read  # type: ignore[method-assign]


def _forward_other_rope_lengths(shift: int) -> None:
    """Computes and signs honestly, but forwards rope lengths off by ``shift``: framing the next hop."""
    from brigade.peer.forwarding import Forwarder

    honest_send = Forwarder.send

    async def framing_send(self: Forwarder, step) -> None:
        if step.rope_lengths:
            shifted = [length + shift for length in step.rope_lengths]
            del step.rope_lengths[:]
            step.rope_lengths.extend(shifted)
        await honest_send(self, step)

    Forwarder.send = framing_send  # type: ignore[method-assign]


def _refuse_every_step(status: str) -> None:
    """Answers every step with the status of a request's own fault (INVALID_ARGUMENT or OUT_OF_RANGE)."""
    from brigade.peer.servicer import PeerServicer
    from brigade.protocol.errors import InvalidRequestError, SessionLengthError

    error = {"invalid": InvalidRequestError, "range": SessionLengthError}[status]

    async def refusing_step(self: PeerServicer, session, message, *rest) -> None:  # type: ignore[no-untyped-def]
        raise error("this peer says the request is wrong (it is not)")

    PeerServicer._step_locked = refusing_step  # type: ignore[method-assign]


def _fail_to_compute() -> None:
    """Every pass over the span raises, as an out-of-memory or a half-moved span would."""

    def failing_forward(self: SpanExecutor, plan: list) -> list[torch.Tensor]:
        raise RuntimeError("CUDA out of memory (pretend)")

    SpanExecutor._forward = failing_forward  # type: ignore[method-assign]


def _truncate_history(missing: int) -> None:
    """Computes honestly, but hands back ``missing`` positions fewer than asked from History."""
    honest_read = OutputHistory.read

    def short_read(self: OutputHistory, start: int, end: int) -> torch.Tensor:
        return honest_read(self, start, end)[:, : max(0, end - start - missing)]

    OutputHistory.read = short_read  # type: ignore[method-assign]


def _shift_attestations(shift: int) -> None:
    """Signs every result at a position off by ``shift`` (validly: the signature is its own)."""
    import brigade.peer.servicer as servicer

    honest_attest = servicer.attest

    def shifted_attest(identity, session_id, step_id, start_position, *args, **kwargs):  # type: ignore[no-untyped-def]
        return honest_attest(identity, session_id, step_id, start_position + shift, *args, **kwargs)

    servicer.attest = shifted_attest  # type: ignore[assignment]


def _refuse_history() -> None:
    """Refuses every History read with an error status, as a peer that does not want to be checked."""
    import grpc

    from brigade.peer.unary import UnaryRpcs

    async def refusing_history(self: UnaryRpcs, request, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAVAILABLE, "busy (it is not)")

    UnaryRpcs.History = refusing_history  # type: ignore[method-assign]


def _frame_upstream() -> None:
    """Signs a hash of other bytes than it received, as if its upstream had pushed something else."""
    import hashlib

    import brigade.peer.servicer as servicer

    honest_attest = servicer.attest

    def framing_attest(identity, session_id, step_id, start_position, layers, input_sha256, *args, **kwargs):  # type: ignore[no-untyped-def]
        forged = hashlib.sha256(b"not what I got" + input_sha256).digest()
        return honest_attest(identity, session_id, step_id, start_position, layers, forged, *args, **kwargs)

    servicer.attest = framing_attest  # type: ignore[assignment]


def _never_push() -> None:
    """Claims every step forwarded (the send "succeeds") but sends nothing to the next hop."""
    from brigade.peer.forwarding import Forwarder

    async def silent_send(self: Forwarder, step) -> None:  # type: ignore[no-untyped-def]
        return None

    Forwarder.send = silent_send  # type: ignore[method-assign]


def _push_other_bytes(scale: float, resign: bool) -> None:
    """Pushes noisy outputs to the next hop; ``resign``: with a valid attestation of the noisy bytes."""
    from brigade.peer.forwarding import Forwarder
    from brigade.protocol.attestation import attest, tensor_digest
    from brigade.protocol.tensors import decode, encode

    honest_send = Forwarder.send

    async def noisy_send(self: Forwarder, step) -> None:  # type: ignore[no-untyped-def]
        tensor = decode(step.hidden)
        noisy = encode(tensor + torch.randn_like(tensor) * scale * tensor.pow(2).mean().sqrt(), tensor.dtype)
        step.hidden.CopyFrom(noisy)
        if resign:
            att = step.pushed_by
            step.pushed_by.CopyFrom(attest(self._identity, att.session_id, att.step_id, att.start_position,
                                           (att.start_layer, att.end_layer), att.input_sha256, tensor_digest(noisy),
                                           att.rope_sha256))
        await honest_send(self, step)

    Forwarder.send = noisy_send  # type: ignore[method-assign]


def _make_up_steps(after: int) -> None:
    """Once, after a one-position push at ``after`` or later, a made-up step over every position so far."""
    from brigade.peer.forwarding import Forwarder
    from brigade.protocol import brigade_pb2 as pb
    from brigade.protocol.attestation import attest, tensor_digest
    from brigade.protocol.tensors import decode, encode

    honest_send = Forwarder.send
    done = []

    async def send_and_make_up(self: Forwarder, step) -> None:  # type: ignore[no-untyped-def]
        await honest_send(self, step)
        tensor = decode(step.hidden)
        if done or tensor.shape[1] != 1 or step.rope_lengths or step.start_position < after:
            return
        done.append(step.step_id)
        start, count = 0, step.start_position + 1
        made_up = pb.Step()
        made_up.CopyFrom(step)
        made_up.step_id, made_up.start_position, made_up.step_positions = step.step_id + 1, start, count
        noise = torch.randn(tensor.shape[0], count, tensor.shape[2]) * tensor.pow(2).mean().sqrt()
        wire = encode(noise.to(tensor.dtype), tensor.dtype)
        made_up.hidden.CopyFrom(wire)
        att = step.pushed_by
        made_up.pushed_by.CopyFrom(attest(self._identity, att.session_id, made_up.step_id, start,
                                          (att.start_layer, att.end_layer), att.input_sha256, tensor_digest(wire),
                                          att.rope_sha256))
        await honest_send(self, made_up)

    Forwarder.send = send_and_make_up  # type: ignore[method-assign]


def _strip_tickets() -> None:
    from brigade.peer.forwarding import Forwarder

    honest_send = Forwarder.send

    async def send_without_tickets(self: Forwarder, step) -> None:  # type: ignore[no-untyped-def]
        del step.tickets[:]
        await honest_send(self, step)

    Forwarder.send = send_without_tickets  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--cheat":
        raise SystemExit("usage: brigade_evil_peer.py --cheat KIND:VALUE <brigade arguments> (see the docstring)")
    kind, _, value = argv[1].partition(":")
    if kind == "noise":
        _add_noise(float(value))
    elif kind == "skip":
        _skip_layer(int(value))
    elif kind == "lie":
        _lie_about_history(float(value))
    elif kind == "rope":
        _forward_other_rope_lengths(int(value))
    elif kind == "refuse":
        _refuse_every_step(value)
    elif kind == "crash":
        _fail_to_compute()
    elif kind == "short-history":
        _truncate_history(int(value))
    elif kind == "shift-attestation":
        _shift_attestations(int(value))
    elif kind == "refuse-history":
        _refuse_history()
    elif kind == "frame-upstream":
        _frame_upstream()
    elif kind == "no-push":
        _never_push()
    elif kind in ("push-other", "push-unsigned"):
        _push_other_bytes(float(value), resign=kind == "push-other")
    elif kind == "made-up-step":
        _make_up_steps(int(value))
    elif kind == "strip-tickets":
        _strip_tickets()
    else:
        raise SystemExit(f"unknown cheat {argv[1]!r}: expected noise:S, skip:K, lie:S, rope:K, refuse:invalid|range, "
                         "crash:, short-history:K, shift-attestation:K, refuse-history:, frame-upstream:, no-push:, "
                         "push-other:S, push-unsigned:S, made-up-step:P or strip-tickets:")
    app(args=argv[2:], prog_name="brigade")


if __name__ == "__main__":
    main(sys.argv[1:])
