"""Opening a gRPC channel to a peer from its signed record: the one place every caller dials through.

Clients, peers (forwarding, pings) and the dashboard all reach peers through ``peer_channel`` or
``dial``, so transport security (TLS pinned to the certificate in the peer's signed record) is
decided here once and cannot be skipped by one caller. Plain text is used only where the caller
explicitly allows it (``--insecure`` private swarms) and the peer offers no certificate.

A peer behind a home router is reached through a relay (``docs/relays.md``): its record names the
relay (``relay_peer_id``) and carries the relay's address. Dialing it is gRPC's own HTTP CONNECT
proxy support: the channel connects to the relay, asks it to ``CONNECT <peer id>.relayed...``, and
then runs TLS, pinned to the relayed peer's own certificate, through that tunnel. The relay copies
ciphertext and never holds a key.
"""

from __future__ import annotations

import os

import grpc

from brigade.protocol.channel_options import grpc_options
from brigade.protocol.records import PeerRecord
from brigade.protocol.tls import TLS_CHANNEL_OPTIONS, pinned_channel_credentials, spki_sha256

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The name a client asks a relay to CONNECT to: "<peer id>.relayed.brigade.invalid:443". ".invalid" can
# never resolve (RFC 2606), so a channel that somehow skipped the relay fails instead of going elsewhere.
RELAY_TARGET_SUFFIX = ".relayed.brigade.invalid"
RELAY_TARGET_PORT = 443


class InsecurePeerError(ConnectionError):
    """The peer offers no TLS certificate and this caller does not accept plain-text peers."""


class RelayDialError(ConnectionError):
    """A relayed peer cannot be dialed from this process (see the message for the fix)."""


def relay_target(peer_id: str) -> str:
    """The CONNECT authority that names ``peer_id`` to its relay."""
    return f"{peer_id}{RELAY_TARGET_SUFFIX}:{RELAY_TARGET_PORT}"


def relayed_peer_of(authority: str) -> str | None:
    """The peer id a CONNECT authority names (the inverse of ``relay_target``), or None if it names none."""
    host, sep, port = authority.rpartition(":")
    if not sep or port != str(RELAY_TARGET_PORT) or not host.endswith(RELAY_TARGET_SUFFIX):
        return None
    peer_id = host[: -len(RELAY_TARGET_SUFFIX)]
    return peer_id if peer_id.isascii() and peer_id.isalnum() and 0 < len(peer_id) <= 64 else None


def _check_no_proxy(target_host: str) -> None:
    """gRPC skips the proxy (here: the relay) for hosts in no_grpc_proxy / no_proxy; say so instead of failing later."""
    value = os.environ.get("no_grpc_proxy", os.environ.get("no_proxy"))
    for entry in (value or "").split(","):
        entry = entry.strip()
        if entry and target_host.lower().endswith(entry.lower()):
            raise RelayDialError(
                f"the no_proxy entry {entry!r} covers relayed peers ({target_host}); gRPC would bypass the relay. "
                f"Remove it, or set no_grpc_proxy (which takes precedence) without it"
            )


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
    relay_for: str = "",
) -> grpc.aio.Channel:
    """An asyncio channel to ``address`` that trusts only ``tls_cert`` (connects lazily, on first use).

    ``spki_pin`` defaults to the certificate's own hash: pass the record's pin when the
    certificate came from elsewhere. With no certificate, plain text if ``allow_insecure``, else
    InsecurePeerError. A certificate that does not match the pin raises TlsPinError.
    ``relay_for``: ``address`` is a relay's, and the channel tunnels through it to that peer id.
    """
    options: list[tuple[str, object]] = [*grpc_options(max_message_bytes)]
    target = address
    if relay_for:
        target = relay_target(relay_for)
        _check_no_proxy(target.rpartition(":")[0])
        options.append(("grpc.http_proxy", f"http://{address}"))
    if not tls_cert:
        if not allow_insecure:
            raise InsecurePeerError(
                f"peer at {address} offers no TLS certificate; only --insecure test swarms allow plain text"
            )
        return grpc.aio.insecure_channel(target, options=options)
    credentials = pinned_channel_credentials(tls_cert, spki_pin or spki_sha256(tls_cert))
    return grpc.aio.secure_channel(target, credentials, options=[*options, *TLS_CHANNEL_OPTIONS])


def peer_channel(
    record: PeerRecord, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, allow_insecure: bool = False
) -> grpc.aio.Channel:
    """An asyncio channel to the peer ``record`` describes, pinned to its record's certificate
    (through its relay when the record names one)."""
    return dial(record.address, record.tls_cert, spki_pin=record.tls_spki_sha256 or None,
                allow_insecure=allow_insecure, max_message_bytes=max_message_bytes,
                relay_for=record.peer_id if record.relay_peer_id else "")
