"""Transport security: each peer's self-signed certificate, pinned by the hash in its signed record.

There is no certificate authority in a volunteer swarm. Instead a peer makes a fresh ECDSA key
and a self-signed certificate when it starts, and its DHT record, signed with its Ed25519
identity, carries the certificate and the SHA-256 of its public key. A client trusts exactly that
certificate as the only root for that one connection: whoever answers must hold the key the
peer's identity vouched for, so a man in the middle, or a peer presenting another certificate,
fails the handshake.

ECDSA P-256 rather than Ed25519 for the TLS key: gRPC's TLS stack does not offer Ed25519
signatures in the handshake.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Every peer certificate names this host, and clients ask for it: what is checked is the pinned
# certificate, not a name (peers are found by DHT records, not DNS).
TLS_SERVER_NAME = "peer.brigade"
TLS_CHANNEL_OPTIONS: list[tuple[str, str]] = [
    ("grpc.ssl_target_name_override", TLS_SERVER_NAME),
    ("grpc.default_authority", TLS_SERVER_NAME),
]
CERT_LIFETIME = datetime.timedelta(days=365)


class TlsPinError(ValueError):
    """A certificate is malformed or does not match the hash a signed record pins."""


@dataclass(frozen=True)
class TlsIdentity:
    """A peer's TLS key and certificate, and the pin its record announces."""

    key_pem: bytes
    cert_pem: bytes
    spki_sha256: str  # hex

    @classmethod
    def generate(cls, common_name: str) -> TlsIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "brigade peer")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=10))  # tolerate clocks a little behind
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(key_pem=key_pem, cert_pem=cert_pem, spki_sha256=spki_sha256(cert_pem))

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def spki_sha256(cert_pem: bytes | str) -> str:
    """Hex SHA-256 of a PEM certificate's SubjectPublicKeyInfo (the pin a record carries)."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TlsPinError(f"not a PEM certificate: {e}") from e
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def pinned_channel_credentials(cert_pem: str | bytes, expected_spki_sha256: str) -> grpc.ChannelCredentials:
    """Credentials that trust only ``cert_pem``, after checking it is the one the record pins."""
    actual = spki_sha256(cert_pem)
    if actual != expected_spki_sha256.lower():
        raise TlsPinError(
            f"certificate key hash {actual[:16]}... does not match the pinned {expected_spki_sha256[:16]}..."
        )
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return grpc.ssl_channel_credentials(root_certificates=data)
