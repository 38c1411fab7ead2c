"""TLS for the benches: an ephemeral CA and certificate (trustme), a client that asks a server
over HTTPS and says what it negotiated and whether it resumes sessions, the OpenSSL config that
turns TLS 1.3 session tickets off, and the TLS log the harness has nginx write."""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import socket
import ssl
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .process import LOOPBACK
from .servers import get_over, split_answer

SERVER_NAME: Final = "localhost"  # what the probe sends as SNI (wrk sends the URL's host)

# -- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files: the root (for clients), the chain a server sends and its key."""

    ca: Path
    fullchain: Path  # the leaf, then the intermediate that signed it (as certbot writes it)
    key: Path
    about: str  # what they are, read back from the files


def make_certificates(directory: Path) -> Certificates:
    """An ephemeral root CA, an intermediate and a leaf for 127.0.0.1 and localhost (trustme's
    default key type, ECDSA P-256, for all three), written to ``directory``. A chain of two, as
    a public CA's (Let's Encrypt sends leaf + intermediate), so the full handshakes carry what
    they carry in production."""
    import trustme  # noqa: PLC0415 - a test dependency, installed by scripts/bootstrap

    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert(LOOPBACK, SERVER_NAME)
    files = Certificates(
        directory / "ca.pem", directory / "fullchain.pem", directory / "privkey.pem", ""
    )
    root.cert_pem.write_to_path(str(files.ca))
    leaf.private_key_pem.write_to_path(str(files.key))
    files.fullchain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.chmod(0o644)  # nginx's workers run as an unprivileged user when root starts it
    made = f"trustme {importlib.metadata.version('trustme')}"
    about = f"{describe(files.fullchain)}, under an ephemeral root ({made})"
    return Certificates(files.ca, files.fullchain, files.key, about)


def describe(fullchain: Path) -> str:
    """The leaf's key and signature, its names and the chain's length, from the PEM file."""
    from cryptography import x509  # noqa: PLC0415 - a runtime dependency of the gateway
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    chain = x509.load_pem_x509_certificates(fullchain.read_bytes())
    leaf = chain[0]
    key = leaf.public_key()
    kind = f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else "non-EC"
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    sans = [str(getattr(name, "value", name)) for name in names]
    signed = leaf.signature_hash_algorithm.name if leaf.signature_hash_algorithm else "?"
    return (
        f"{kind} leaf for {', '.join(sans)} (signed with {signed.upper()}), chain of {len(chain)}"
    )


# -- a client that checks a server ---------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Two HTTPS GETs on fresh connections, the second offering the first one's session."""

    status: int | None
    version: str | None  # of the first connection
    cipher: str | None
    alpn: str | None
    hsts: str | None  # its Strict-Transport-Security header
    resumed: bool  # whether the server resumed the session on the second connection
    error: str | None = None


def client_context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["http/1.1"])
    return context


def _hsts(head: bytes) -> str | None:
    found = re.search(rb"^strict-transport-security:\s*(.*?)\s*$", head, re.IGNORECASE | re.M)
    return found.group(1).decode() if found else None


@dataclass(frozen=True)
class Exchange:
    """One GET over a fresh TLS connection: the answer, and what the connection was."""

    answer: bytes
    version: str | None
    cipher: str | None
    alpn: str | None
    session: ssl.SSLSession | None  # with its tickets: read after the whole answer
    resumed: bool


def https_get(
    port: int,
    path: str,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    timeout: float = 2.0,
) -> Exchange:
    """``GET path`` over TLS on 127.0.0.1:``port`` (SNI localhost), offering ``session``."""
    with (
        socket.create_connection((LOOPBACK, port), timeout) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME, session=session) as sock,
    ):
        sock.settimeout(timeout)
        answer = get_over(sock, path, SERVER_NAME)
        cipher = sock.cipher()
        return Exchange(
            answer,
            sock.version(),
            cipher[0] if cipher else None,
            sock.selected_alpn_protocol(),
            sock.session,
            bool(sock.session_reused),
        )


def https_status(port: int, path: str, ca: Path) -> int | None:
    with contextlib.suppress(OSError):
        return split_answer(https_get(port, path, client_context(ca)).answer)[0]
    return None


def probe(port: int, path: str, ca: Path) -> Probe:
    """What a server negotiates with a default client (TLS 1.3 unless it refuses it) and
    whether it resumes a session it issued."""
    context = client_context(ca)
    try:
        first = https_get(port, path, context)
        second = https_get(port, path, context, first.session)
    except OSError as exc:
        return Probe(None, None, None, None, None, resumed=False, error=str(exc))
    status, head, _ = split_answer(first.answer)
    return Probe(status, first.version, first.cipher, first.alpn, _hsts(head), second.resumed)


# -- OpenSSL: no session tickets -----------------------------------------------------------

# OPENSSL_CONF for a server that must make every handshake a full one: TLS 1.3 resumes only
# by tickets, and with none sent (NumTickets = 0, the SSL_CTX_set_num_tickets of every context
# the process makes, nginx's and Python's alike) a client has nothing to resume. TLS 1.2 can
# still resume by session ID; the harness's clients speak 1.3. CipherString is what Debian's
# /etc/ssl/openssl.cnf sets, which this file replaces; both servers set their own list after.
NO_TICKETS_CONF: Final = """\
# Made by the bench (bench/lib/tls.py): servers that send no TLS 1.3 session tickets.
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
CipherString = DEFAULT:@SECLEVEL=2
NumTickets = 0
"""


def no_tickets_env(directory: Path) -> dict[str, str]:
    """The environment variable that gives a server (nginx, the gateway) NO_TICKETS_CONF."""
    path = directory / "openssl-no-tickets.cnf"
    path.write_text(NO_TICKETS_CONF)
    return {"OPENSSL_CONF": str(path)}


# -- nginx's TLS log -----------------------------------------------------------------------

# One line per request, with Connection: close one per connection (nginx >= 1.21.5: $ssl_curve).
NGINX_TLS_LOG_FORMAT: Final = (
    "log_format tls '$ssl_protocol $ssl_cipher $ssl_curve $ssl_session_reused';"
)


@dataclass(frozen=True)
class TlsLog:
    requests: int
    resumed: int  # requests on a resumed session ($ssl_session_reused "r")
    negotiated: dict[str, int]  # "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519": requests


def parse_tls_log(text: str) -> TlsLog:
    """The lines NGINX_TLS_LOG_FORMAT writes; ValueError on any other line."""
    negotiated: Counter[str] = Counter()
    resumed = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 4 or fields[3] not in ("r", "."):
            raise ValueError(f"not a line of the TLS log format: {line!r}")
        negotiated[" ".join(fields[:3])] += 1
        resumed += fields[3] == "r"
    return TlsLog(sum(negotiated.values()), resumed, dict(negotiated))
