"""Opening a gRPC channel to a peer from its signed record: the one place every caller dials through.

Clients, peers (forwarding, pings) and the dashboard all reach peers through ``peer_channel``, so
transport security (TLS pinned to the certificate hash in the peer's signed record) is decided
here once and cannot be skipped by one caller.
"""

from __future__ import annotations

import grpc

from brigade.protocol.channel_options import grpc_options
from brigade.protocol.records import PeerRecord

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def peer_channel(record: PeerRecord, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """An asyncio channel to the peer ``record`` describes (connects lazily, on first use)."""
    return grpc.aio.insecure_channel(record.address, options=grpc_options(max_message_bytes))
