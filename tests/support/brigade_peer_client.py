"""Talking to one peer by hand in tests: a TLS channel pinned to its certificate, and signed requests.

The client library does all of this for users; tests that probe a peer's handling of bad or
hostile input build the messages themselves, and need the same credentials an honest client has.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.tls import TLS_CHANNEL_OPTIONS
from brigade.protocol.tokens import make_token

CLIENT = Identity.generate()  # one test client identity per test process


def peer_channel(info: dict[str, object], options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A synchronous channel to the peer whose ready line is ``info``, pinned to its certificate."""
    cert = str(info.get("tls_cert") or "")
    address = str(info["address"])
    if not cert:
        return grpc.insecure_channel(address, options=list(options))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.encode())
    return grpc.secure_channel(address, credentials, options=[*options, *TLS_CHANNEL_OPTIONS])


def peer_stub(info: dict[str, object], options: Sequence[tuple[str, object]] = ()) -> tuple[grpc.Channel,
                                                                                           pb_grpc.PeerStub]:
    channel = peer_channel(info, options)
    return channel, pb_grpc.PeerStub(channel)


def open_session(info: dict[str, object], session_id: str, *, identity: Identity = CLIENT,
                 **fields: object) -> pb.InferenceRequest:
    """An OpenSession request signed by ``identity`` for the peer ``info`` names."""
    token = make_token(identity, str(info["peer_id"]), "open", session_id.encode())
    return pb.InferenceRequest(open=pb.OpenSession(session_id=session_id, token=token, **fields))


def forward_token(info: dict[str, object], identity: Identity = CLIENT) -> pb.Token:
    return make_token(identity, str(info["peer_id"]), "forward")
