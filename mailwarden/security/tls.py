"""The one place server TLS contexts are built.

Policy (Mozilla "intermediate" minus its non-AEAD and non-PFS parts):
TLS 1.2 and 1.3 only; on 1.2, ECDHE key exchange with AEAD ciphers only;
the server picks the cipher; no compression; no renegotiation. TLS 1.3
suites are all AEAD with (EC)DHE by construction.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_START_ATTEMPTS = 5

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"


class TlsConfigError(Exception):
    """The certificate or key cannot be loaded."""


class ServerTls:
    """Holds the shared server context and reloads its certificate in place.

    Every listener uses the same `SSLContext` object, so `reload()` (called
    on SIGHUP) swaps the certificate for all new handshakes at once, while
    sessions already established keep theirs.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = build_server_context()
        # A certificate and key that do not match at start-up are most likely a
        # renewal caught between writing the two files; give it a moment.
        for attempt in range(_START_ATTEMPTS):
            try:
                self.reload()
                return
            except TlsConfigError:
                if attempt == _START_ATTEMPTS - 1:
                    raise
                time.sleep(0.2)

    def reload(self) -> None:
        try:
            self.context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load {self.cert} / {self.key}: {exc}") from exc


def build_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_SINGLE_ECDH_USE
    # Clients (MTAs) rarely present certificates; we don't ask for them.
    ctx.verify_mode = ssl.CERT_NONE
    ctx.check_hostname = False
    return ctx


def write_self_signed(cert_path: Path, key_path: Path, hostname: str, days: int = 825) -> None:
    """A self-signed ECDSA P-256 certificate for `hostname`, for first start.

    Administrators replace it with a CA-issued one; SIGHUP picks it up.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        alt = x509.DNSName(hostname)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
