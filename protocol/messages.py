"""Typed messages for what crosses the wire: one ``from_proto`` (every check, once) and one ``to_proto`` each.

Raw protobuf objects stop at this module. A receiver turns a message into one of these models, and
the model's ``from_proto`` is the only place its fields are checked: a peer's checks of a client's
request raise the request's own errors (``InvalidRequestError``, ``InvalidTensorError``,
``SessionLengthError``: every peer would refuse it), a client's checks of a peer's answer raise
``BadAnswerError`` (the peer's fault: ban it and route around). Models are frozen and strict, in
the style of exo's ``FrozenModel``; tensors ride along decoded, with the SHA-256 of their wire form
that attestations sign.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.attestation import tensor_digest
from brigade.protocol.errors import (
    BadAnswerError,
    BrigadeError,
    InvalidRequestError,
    InvalidTensorError,
    SessionLengthError,
)
from brigade.protocol.tensors import DTYPE_NAMES, TensorLimits, decode, encode
from brigade.protocol.tickets import MAX_TICKETS, PUSH_KEY_BYTES

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_ADDRESS_CHARS = 256
MAX_CERT_CHARS = 8192


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", arbitrary_types_allowed=True)


class Hidden(FrozenModel):
    """Hidden states [B, T, H] as they crossed the wire, and the digest of that wire form."""

    tensor: torch.Tensor
    digest: bytes

    @classmethod
    def from_proto(cls, message: pb.Tensor, limits: TensorLimits, *, batch: int, width: int,
                   error: type[BrigadeError] = InvalidTensorError, digest: bytes | None = None) -> Hidden:
        """Decodes (within ``limits``) and checks the shape: ``[batch, positions > 0, width]``.

        ``digest``: ``tensor_digest(message)`` when the caller already hashed it (a push is hashed once)."""
        try:
            tensor = decode(message, limits)
        except InvalidTensorError as e:
            raise error(str(e)) from e
        check_hidden(tensor, batch, width, error)
        return cls(tensor=tensor, digest=tensor_digest(message) if digest is None else digest)

    @classmethod
    def of(cls, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[Hidden, pb.Tensor]:
        """A tensor to send: the model and its wire form (encoded once, hashed once)."""
        wire = encode(tensor, dtype)
        return cls(tensor=tensor if dtype is None else tensor.to(dtype), digest=tensor_digest(wire)), wire


def check_hidden(tensor: torch.Tensor, batch: int | None, width: int,
                 error: type[BrigadeError] = InvalidTensorError) -> None:
    """The one shape rule of hidden states: ``[batch, positions > 0, width]``."""
    if tensor.dim() != 3 or tensor.shape[1] == 0:
        raise error(f"hidden states must be [batch, positions>0, hidden], got {list(tensor.shape)}")
    if tensor.shape[2] != width:
        raise error(f"hidden size {tensor.shape[2]} does not match the model's {width}")
    if batch is not None and tensor.shape[0] != batch:
        raise error(f"batch of {tensor.shape[0]} does not match the session's {batch}")


class NextHop(FrozenModel):
    """Where a peer sends a session's outputs (the client names it; issue 19 binds it to the record)."""

    peer_id: str
    address: str
    session_id: str
    tls_cert: str = ""
    relay_peer_id: str = ""

    @classmethod
    def from_proto(cls, message: pb.NextHop) -> NextHop:
        if not SESSION_ID.match(message.session_id) or not message.address:
            raise InvalidRequestError("next hop needs an address and a valid session_id")
        if len(message.address) > MAX_ADDRESS_CHARS or len(message.peer_id) > 128:
            raise InvalidRequestError("next hop address or peer id is too long")
        if len(message.tls_cert) > MAX_CERT_CHARS:
            raise InvalidRequestError("next hop certificate is too large")
        return cls(peer_id=message.peer_id, address=message.address, session_id=message.session_id,
                   tls_cert=message.tls_cert, relay_peer_id=message.relay_peer_id[:128])

    def to_proto(self) -> pb.NextHop:
        return pb.NextHop(peer_id=self.peer_id, address=self.address, session_id=self.session_id,
                          tls_cert=self.tls_cert, relay_peer_id=self.relay_peer_id)


class SessionLimits(FrozenModel):
    """What one peer admits: its span, batch and length caps."""

    start_layer: int
    end_layer: int
    max_batch_size: int
    max_length: int  # min(the peer's --max-session-length, the model's positions)
    peer_max_length: int  # the peer's own cap, named in the refusal
    model_positions: int


class OpenSession(FrozenModel):
    session_id: str
    start_layer: int
    end_layer: int
    batch_size: int
    max_length: int
    pad_lengths: tuple[int, ...]
    open_timeout_s: float
    token: Any = None  # pb.Token, checked by the servicer's TokenVerifier (its purpose binds session_id)
    next: NextHop | None = None
    upstream_peer_id: str = ""
    keep_outputs: bool = False
    push_key: bytes = b""  # set: pushes need this client's tickets (protocol/tickets.py)

    @classmethod
    def from_proto(cls, message: pb.OpenSession, limits: SessionLimits) -> OpenSession:
        if not SESSION_ID.match(message.session_id):
            raise InvalidRequestError("session_id must be 8 to 64 characters of [A-Za-z0-9_-]")
        start, end = message.start_layer, message.end_layer
        if not limits.start_layer <= start < end <= limits.end_layer:
            raise InvalidRequestError(f"layers {start}:{end} are not inside this peer's span "
                                      f"{limits.start_layer}:{limits.end_layer}")
        if not 1 <= message.batch_size <= limits.max_batch_size:
            raise InvalidRequestError(f"batch_size must be in [1, {limits.max_batch_size}]")
        if message.max_length < 1:
            raise InvalidRequestError("max_length must be at least 1")
        if message.max_length > limits.max_length:
            raise SessionLengthError(
                f"max_length must be in [1, {limits.max_length}] here, got {message.max_length} (prompt plus new "
                f"tokens); this peer allows {limits.peer_max_length} (--max-session-length), the model "
                f"{limits.model_positions} positions")
        pads = tuple(message.pad_lengths) or (0,) * message.batch_size
        if len(pads) != message.batch_size or any(pad >= message.max_length for pad in pads):
            raise InvalidRequestError("pad_lengths needs one value per sequence, each below max_length")
        if len(message.upstream_peer_id) > 128:
            raise InvalidRequestError("upstream_peer_id is too long")
        if len(message.push_key) not in (0, PUSH_KEY_BYTES):
            raise InvalidRequestError(f"push_key must be empty or {PUSH_KEY_BYTES} bytes")
        return cls(
            session_id=message.session_id, start_layer=start, end_layer=end, batch_size=message.batch_size,
            max_length=message.max_length, pad_lengths=pads, open_timeout_s=float(message.open_timeout_s),
            token=message.token if message.HasField("token") else None,
            next=NextHop.from_proto(message.next) if message.HasField("next") else None,
            upstream_peer_id=message.upstream_peer_id, keep_outputs=message.keep_outputs,
            push_key=bytes(message.push_key),
        )

    def to_proto(self) -> pb.OpenSession:
        message = pb.OpenSession(
            session_id=self.session_id, start_layer=self.start_layer, end_layer=self.end_layer,
            batch_size=self.batch_size, max_length=self.max_length, pad_lengths=list(self.pad_lengths),
            open_timeout_s=self.open_timeout_s, upstream_peer_id=self.upstream_peer_id,
            keep_outputs=self.keep_outputs, push_key=self.push_key)
        if self.token is not None:
            message.token.CopyFrom(self.token)
        if self.next is not None:
            message.next.CopyFrom(self.next.to_proto())
        return message


class Step(FrozenModel):
    """Hidden states for positions ``[start_position, start_position + T)`` of one session.

    ``rope_lengths``: per position, the length of the forward call it belongs to (length-dependent
    ropes; empty otherwise, or when this message is the whole call): see ``kernels/rope.py``.
    """

    hidden: Hidden
    start_position: int
    step_id: int
    step_positions: int
    rope_lengths: tuple[int, ...] = ()
    tickets: tuple[Any, ...] = ()  # pb.PushTicket each, passed on with a push (protocol/tickets.py)

    @property
    def positions(self) -> int:
        return self.hidden.tensor.shape[1]

    @classmethod
    def from_proto(cls, message: pb.Step, limits: TensorLimits, *, batch: int, width: int, max_length: int,
                   digest: bytes | None = None) -> Step:
        """Everything a peer checks of a step before it spends anything on it."""
        hidden = Hidden.from_proto(message.hidden, limits, batch=batch, width=width, digest=digest)
        positions = hidden.tensor.shape[1]
        if message.start_position + positions > max_length:
            raise SessionLengthError(f"step would reach position {message.start_position + positions}, past the "
                                     f"session's max_length {max_length}")
        rope = message.rope_lengths
        if rope and len(rope) != positions:
            raise InvalidRequestError(f"rope_lengths has {len(rope)} values for {positions} positions")
        values = tuple(rope)
        if values and (min(values) < 1 or max(values) > max_length):
            raise InvalidRequestError(f"rope_lengths must lie in [1, {max_length}], the session's max_length")
        tickets = tuple(message.tickets)
        if len(tickets) > MAX_TICKETS or any(len(entry.session_id) > 64 or len(entry.tag) != 32 for entry in tickets):
            raise InvalidRequestError(f"a step carries at most {MAX_TICKETS} tickets, each of one session id "
                                      "and a 32-byte tag")
        return cls(hidden=hidden, start_position=message.start_position, step_id=message.step_id,
                   step_positions=message.step_positions, rope_lengths=values, tickets=tickets)

    @staticmethod
    def proto(hidden: pb.Tensor, start_position: int, step_id: int, step_positions: int,
              rope_lengths: list[int] | tuple[int, ...] = (), tickets: tuple[Any, ...] = ()) -> pb.Step:
        """A step to send, from its wire tensor (the sender encodes once and may hash the same bytes)."""
        return pb.Step(hidden=hidden, start_position=start_position, step_id=step_id, step_positions=step_positions,
                       rope_lengths=list(rope_lengths), tickets=list(tickets))


class StepAnswer(FrozenModel):
    """One chunk of a step's result as a client receives it from a hop."""

    start_position: int
    positions: int
    length: int
    step_id: int
    compute_ms: float
    queue_ms: float
    peer_leaving: bool
    forwarded: bool
    forward_error: str
    attestation: Any  # pb.Attestation
    hidden: Hidden | None = None  # the outputs, when the hop returned them
    upstream: Any = None  # pb.Attestation: the pusher's, of the push this was computed from (checked by the peer)
    upstream_positions: int = 0  # positions of that push (this answer may cover a chunk of it)

    @classmethod
    def from_proto(cls, message: pb.StepResult, *, expected_start: int, remaining: int, batch: int, width: int,
                   wire_dtype: torch.dtype, limits: TensorLimits = TensorLimits()) -> StepAnswer:
        """Checks an answer against what this client asked: the positions it should cover next, and (when it
        carries tensors) their shape and dtype. Anything else is the peer's fault (``BadAnswerError``)."""
        position, positions = message.start_position, message.positions
        if positions <= 0 or position != expected_start or positions > remaining:
            raise BadAnswerError(f"answered positions {position}+{positions}, expected {expected_start} and at most "
                                 f"{remaining} more")
        hidden = None
        if message.HasField("hidden") and (message.hidden.data or message.hidden.shape):
            hidden = Hidden.from_proto(message.hidden, limits, batch=batch, width=width, error=BadAnswerError)
            if hidden.tensor.shape[1] != positions or hidden.tensor.dtype != wire_dtype:
                raise BadAnswerError(f"answered shape {list(hidden.tensor.shape)} {DTYPE_NAMES[hidden.tensor.dtype]} "
                                     f"for {positions} positions in {DTYPE_NAMES[wire_dtype]}")
        return cls(start_position=position, positions=positions, length=message.length, step_id=message.step_id,
                   compute_ms=float(message.compute_ms), queue_ms=float(message.queue_ms),
                   peer_leaving=message.peer_leaving, forwarded=message.forwarded,
                   forward_error=message.forward_error[:1024], attestation=message.attestation, hidden=hidden,
                   upstream=message.upstream if message.HasField("upstream") else None,
                   upstream_positions=message.upstream_positions)


def history_answer(message: pb.HistoryResponse, *, batch: int, width: int, positions: int,
                   limits: TensorLimits = TensorLimits()) -> torch.Tensor:
    """A hop's kept outputs [B, positions, H] as a client asked for them; a short or odd one is the peer's fault."""
    hidden = Hidden.from_proto(message.hidden, limits, batch=batch, width=width, error=BadAnswerError)
    if hidden.tensor.shape[1] != positions:
        raise BadAnswerError(f"History answered {hidden.tensor.shape[1]} positions, {positions} were asked for")
    return hidden.tensor


def forward_answer(message: pb.ForwardResponse, *, batch: int, width: int, positions: int,
                   limits: TensorLimits = TensorLimits()) -> torch.Tensor:
    """A stateless pass's output, which must have its input's shape."""
    hidden = Hidden.from_proto(message.hidden, limits, batch=batch, width=width, error=BadAnswerError)
    if hidden.tensor.shape[1] != positions:
        raise BadAnswerError(f"answered {hidden.tensor.shape[1]} positions for {positions}")
    return hidden.tensor
