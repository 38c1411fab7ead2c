"""Certificate files: reading a PEM pair with a clear reason when it will not do, the names and
expiry of a certificate, and the self-signed placeholder served while ACME orders a real one.

A leaf: ``config/`` uses it to validate the files a config names (``check``, a reload), the TLS
listener (``edge/tls.py``) to load and reload them, ACME to read back what it stored. It
imports ``cryptography`` only when called, so commands that never touch a certificate do not
pay for it.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from cryptography import x509

PLACEHOLDER_DAYS: Final = 7


class CertError(Exception):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Pair:
    """A certificate (with its chain) and its private key, read and checked together."""

    cert_path: str
    key_path: str
    names: tuple[str, ...]  # DNS names it is valid for (lowercase; "*.x" for a wildcard)
    not_after: float  # expiry, seconds since the epoch
    not_before: float  # start of validity, seconds since the epoch (ACME: when to renew)
    fingerprint: str  # SHA-256 of the leaf, hex: tells a renewed certificate from the old one


def read_pair(cert_path: str, key_path: str) -> Pair:
    """Read and check a PEM certificate chain and its key: both files readable, the first
    certificate's public key the key's. Raises ``CertError`` naming the file and the reason."""
    from cryptography import x509  # noqa: PLC0415 - only when certificates are in use
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415

    chain = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key")
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError:
        raise CertError(f"{cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertError(f"{key_path}: the key is encrypted (give it without a password)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{key_path}: not a PEM private key") from None
    leaf = certificates[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    try:
        matching = leaf.public_key().public_bytes(encoding, public) == key.public_key(
        ).public_bytes(encoding, public)  # fmt: skip
        names = names_of(leaf)
    except (ValueError, UnsupportedAlgorithm) as exc:  # a malformed extension, an odd key
        raise CertError(f"{cert_path}: the certificate cannot be read ({exc})") from None
    if not matching:
        raise CertError(f"{key_path}: the key does not match the certificate in {cert_path}")
    return Pair(
        cert_path=cert_path,
        key_path=key_path,
        names=names,
        not_after=leaf.not_valid_after_utc.timestamp(),
        not_before=leaf.not_valid_before_utc.timestamp(),
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
    )


def names_of(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of the subject alternative name extension, else the common name."""
    from cryptography import x509  # noqa: PLC0415 - only when certificates are in use
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(a.value).lower() for a in common)
    return tuple(name.lower() for name in extension.value.get_values_for_type(x509.DNSName))


def check_ca(path: str) -> None:
    """Raise ``CertError`` unless ``path`` is a PEM file of at least one CA certificate."""
    _read(path, "CA")
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise CertError(f"{path}: not a PEM CA certificate ({exc.reason or exc})") from None


def matches(pattern: str, name: str) -> bool:
    """Whether a certificate name (``*.x`` matches one label) covers a host name."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return False


def placeholder(names: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A self-signed certificate and key (PEM) for ``names``, valid a week: served while the
    real certificate is being ordered, so the TLS listener can start at once."""
    from cryptography import x509  # noqa: PLC0415 - only when ACME is in use
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "daarion-gateway placeholder")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=PLACEHOLDER_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise CertError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    if not data.strip():
        raise CertError(f"{path}: the {what} file is empty")
    return data
