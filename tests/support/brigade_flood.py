"""A flooding client: one huge gRPC request streamed over HTTP/2 and TLS, built lazily as it is sent.

A gRPC client library must hold a whole message before it sends it (1 GiB request = 1 GiB, and a
copy, in the client). This one writes the HTTP/2 frames itself (``h2``), so the message's header
says "1 GiB follows" and the body is generated chunk by chunk as the peer's flow-control window
opens: the client holds a few MiB at most, and the peer sees exactly what a hostile sender would
send. It stops when the peer ends the stream (trailers with a grpc-status, or a reset).

``tensor_message_head`` writes the protobuf encoding of a message whose last field is a tensor's
``data``, up to that data, so the bytes on the wire are a real InferenceRequest or ForwardRequest.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from brigade.protocol.tls import TLS_SERVER_NAME

CHUNK = 1 << 20
_LEN = 2  # protobuf wire type: length-delimited
_VARINT = 0


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint(field_number << 3 | wire_type)


def length_delimited(field_number: int, payload_len: int) -> bytes:
    return tag(field_number, _LEN) + varint(payload_len)


def tensor_head(shape: list[int], data_len: int, dtype: str = "float32") -> bytes:
    """A ``pb.Tensor`` up to its data: dtype, packed shape, and the data field's tag and length."""
    packed = b"".join(varint(dim) for dim in shape)
    return (length_delimited(1, len(dtype)) + dtype.encode() + length_delimited(2, len(packed)) + packed
            + length_delimited(3, data_len))


def wrap(field_number: int, head: bytes, data_len: int, before: bytes = b"") -> bytes:
    """``before`` then field ``field_number`` holding a message that is ``head`` plus ``data_len`` bytes."""
    return before + length_delimited(field_number, len(head) + data_len) + head


def step_request_head(session_id: str, shape: list[int], data_len: int) -> bytes:
    """An ``InferenceRequest`` carrying one step of a tensor of ``data_len`` bytes, up to that data."""
    step = wrap(1, tensor_head(shape, data_len), data_len, before=tag(3, _VARINT) + varint(1))  # step_id=1
    return wrap(2, step, data_len, before=length_delimited(3, len(session_id)) + session_id.encode())


def forward_request_head(token: bytes, end_layer: int, shape: list[int], data_len: int) -> bytes:
    """A ``ForwardRequest`` (layers 0:end_layer, a signed token) with ``data_len`` bytes of tensor, up to them."""
    before = tag(2, _VARINT) + varint(end_layer) + length_delimited(5, len(token)) + token
    return wrap(3, tensor_head(shape, data_len), data_len, before=before)


def grpc_frame(message: bytes) -> bytes:
    return struct.pack("!BI", 0, len(message)) + message


@dataclass
class FloodResult:
    status: int | None  # grpc-status the peer ended the stream with (None: reset or closed without one)
    message: str
    body_bytes_sent: int  # bytes of the huge message's body that got onto the wire
    seconds: float
    events: list[str] = field(default_factory=list)


def flood(address: str, cert_pem: str, method: str, prefix_messages: list[bytes], head: bytes, body_len: int,
          *, timeout_s: float = 60.0) -> FloodResult:
    """Sends ``prefix_messages`` (whole gRPC messages), then one message of ``len(head) + body_len`` bytes
    whose body is zeros generated on the fly, on one call of ``method`` ("/brigade.v1.Peer/Inference").

    The connection is TLS pinned to ``cert_pem``; an empty ``cert_pem`` speaks plain HTTP/2.
    """
    host, port = address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10)
    if cert_pem:
        context = ssl.create_default_context(cadata=cert_pem)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the pinned self-signed certificate is the root
        context.set_alpn_protocols(["h2"])
        sock: socket.socket = context.wrap_socket(raw, server_hostname=TLS_SERVER_NAME)
    else:
        sock = raw
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    stream = connection.get_next_available_stream_id()
    connection.send_headers(stream, [
        (":method", "POST"), (":scheme", "https" if cert_pem else "http"), (":path", method),
        (":authority", TLS_SERVER_NAME), ("content-type", "application/grpc"), ("te", "trailers"),
    ])
    header = struct.pack("!BI", 0, len(head) + body_len) + head
    pending = b"".join(grpc_frame(message) for message in prefix_messages) + header
    zeros = bytes(CHUNK)
    sent_body = 0
    result = FloodResult(None, "", 0, 0.0)
    began = time.monotonic()
    ended = False
    try:
        while not ended and time.monotonic() - began < timeout_s:
            window = min(connection.local_flow_control_window(stream), connection.max_outbound_frame_size)
            if window > 0 and (pending or sent_body < body_len):
                if pending:
                    chunk, pending = pending[:window], pending[window:]
                else:
                    chunk = zeros[: min(window, body_len - sent_body)]
                    sent_body += len(chunk)
                connection.send_data(stream, chunk, end_stream=not pending and sent_body >= body_len)
                sock.sendall(connection.data_to_send())
                timeout = 0.0
            else:
                timeout = 0.5
            readable, _, _ = select.select([sock], [], [], timeout)
            if not readable and not (cert_pem and sock.pending()):  # type: ignore[attr-defined]
                continue
            data = sock.recv(1 << 16)
            if not data:
                result.events.append("connection closed")
                break
            for event in connection.receive_data(data):
                result.events.append(type(event).__name__)
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers = dict(event.headers)
                    if "grpc-status" in headers:
                        result.status = int(headers["grpc-status"])
                        result.message = headers.get("grpc-message", "")
                elif isinstance(event, h2.events.DataReceived):
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated):
                    ended = True
            outgoing = connection.data_to_send()
            if outgoing:
                sock.sendall(outgoing)
    finally:
        result.body_bytes_sent = sent_body
        result.seconds = time.monotonic() - began
        sock.close()
    return result
