"""Opening a gRPC channel to a peer from its signed record: the one place every caller dials through.

Clients, peers (forwarding, pings) and the dashboard all reach peers through ``peer_channel`` or
``dial``, so transport security (TLS pinned to the certificate in the peer's signed record) is
decided here once and cannot be skipped by one caller. Plain text is used only where the caller
explicitly allows it (``--insecure`` private swarms) and the peer offers no certificate.
"""

from __future__ import annotations

import grpc

from brigade.protocol.channel_options import grpc_options
from brigade.protocol.records import PeerRecord
from brigade.protocol.tls import TLS_CHANNEL_OPTIONS, pinned_channel_credentials, spki_sha256

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class InsecurePeerError(ConnectionError):
    """The peer offers no TLS certificate and this caller does not accept plain-text peers."""


def handshake_failure(address: str, details: str) -> str | None:
    """A readable reason when a call to ``address`` failed in the TLS handshake; None for other failures.

    gRPC reports a pinned certificate that does not match as UNAVAILABLE with OpenSSL's words
    ("CERTIFICATE_VERIFY_FAILED: self signed certificate"), which reads like a local problem. It
    means the peer did not prove it holds the key its signed record vouches for.
    """
    text = details.lower()
    if "handshake" not in text:
        return None
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return (f"TLS handshake failed: the peer at {address} did not present the certificate its signed "
                "record pins (a stale record, a misconfigured peer, or someone in between); it is not trusted")
    if "wrong_version_number" in text:
        return f"TLS handshake failed: the peer at {address} does not speak TLS (an --insecure peer?)"
    return f"TLS handshake with the peer at {address} failed: {details}"


def dial(
    address: str,
    tls_cert: str,
    *,
    spki_pin: str | None = None,
    allow_insecure: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """An asyncio channel to ``address`` that trusts only ``tls_cert`` (connects lazily, on first use).

    ``spki_pin`` defaults to the certificate's own hash: pass the record's pin when the
    certificate came from elsewhere. With no certificate, plain text if ``allow_insecure``, else
    InsecurePeerError. A certificate that does not match the pin raises TlsPinError.
    """
    options = grpc_options(max_message_bytes)
    if not tls_cert:
        if not allow_insecure:
            raise InsecurePeerError(
                f"peer at {address} offers no TLS certificate; only --insecure test swarms allow plain text"
            )
        return grpc.aio.insecure_channel(address, options=options)
    credentials = pinned_channel_credentials(tls_cert, spki_pin or spki_sha256(tls_cert))
    return grpc.aio.secure_channel(address, credentials, options=[*options, *TLS_CHANNEL_OPTIONS])


def peer_channel(
    record: PeerRecord, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, allow_insecure: bool = False
) -> grpc.aio.Channel:
    """An asyncio channel to the peer ``record`` describes, pinned to its record's certificate."""
    return dial(record.address, record.tls_cert, spki_pin=record.tls_spki_sha256 or None,
                allow_insecure=allow_insecure, max_message_bytes=max_message_bytes)
