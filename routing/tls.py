"""Encrypted hops: each node's self-signed TLS certificate, pinned by its signed DHT record.

A node makes a fresh key and self-signed certificate when its process starts (``NodeCertificate``) and announces
the certificate in its record (``ServerRecord.tls_cert``), which its RSA key signs (``routing.signing``).
A peer dialling it trusts that certificate alone as the channel's root (``channel_credentials``): no
certificate authority, and a node presenting any other certificate fails the TLS handshake. The name in
the certificate is the fixed ``TLS_NAME`` (gRPC checks a name; the pinned certificate is what binds it).
A record without a certificate is a node started with ``--insecure``: it is dialled in plaintext, unless
the client requires TLS (``ClientConfig.require_tls``).
"""

from __future__ import annotations

import datetime
import functools
import hashlib

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TLS_NAME = "homeswarm.node"  # the name in every node's certificate; channels override the target name with it
MAX_CERT_CHARS = 4096
_HANDSHAKE_WORDS = ("handshake", "ssl", "certificate", "tsi_")


class NodeCertificate:
    """A node's TLS key and self-signed certificate (P-256, valid from an hour ago for ten years)."""

    def __init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem.encode())])

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


@functools.lru_cache(maxsize=1024)
def fingerprint(cert_pem: str) -> str:
    """SHA-256 of the certificate's DER bytes, hex; ValueError if ``cert_pem`` is not one PEM certificate."""
    if len(cert_pem) > MAX_CERT_CHARS or not cert_pem.startswith("-----BEGIN CERTIFICATE-----"):
        raise ValueError("not a PEM certificate")
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def channel_credentials(cert_pem: str) -> grpc.ChannelCredentials:
    """Credentials that trust ``cert_pem`` alone (use with ``channel_options``)."""
    return grpc.ssl_channel_credentials(root_certificates=cert_pem.encode())


def channel_options(options: tuple = ()) -> tuple:
    """``options`` plus the target-name override that makes gRPC check the name in node certificates."""
    return (*options, ("grpc.ssl_target_name_override", TLS_NAME), ("grpc.default_authority", TLS_NAME))


def explain(details: str | None, pinned: str) -> str:
    """gRPC's error text, with what a failed handshake on a channel pinned to the certificate of
    fingerprint ``pinned`` means ("": a plaintext channel, nothing to add)."""
    details = details or ""
    if pinned and any(word in details.lower() for word in _HANDSHAKE_WORDS):
        return ("TLS handshake failed: the node's certificate is not the one its signed record pins "
                f"(sha256 {pinned[:16]}…); refused: {details}")
    return details
