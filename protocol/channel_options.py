"""gRPC channel and server options both ends must agree on.

Keepalive limits are part of the contract: if a client pinged more often than the peer permits,
the peer would close the connection as abusive, so both sides take them from here.
"""

from __future__ import annotations

KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message caps in both directions plus the shared keepalive limits."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *KEEPALIVE_OPTIONS,
    ]
