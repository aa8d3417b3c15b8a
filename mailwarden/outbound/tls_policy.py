"""What TLS a connection to one MX host must have, and the client TLS contexts for it.

The levels follow Postfix's names, from weakest to strongest:

* `may`: opportunistic STARTTLS, the certificate not checked (RFC 7435). If the
  server offers no STARTTLS, or the handshake fails, the mail goes in clear, as
  every MTA does; otherwise mail to most of the Internet would stop.
* `testing`: an MTA-STS policy in testing mode: like `may`, but a verified
  handshake is tried first and a failure is logged (`event=tls_policy`).
* `encrypt`: a DNSSEC-secure TLSA RRset with no usable record (RFC 7672 §2.2):
  TLS is required, the certificate is not checked.
* `verify`: MTA-STS enforce (RFC 8461 §4.2): TLS is required and the
  certificate must be valid for the MX host name, from a trusted CA.
* `dane`: usable TLSA records (RFC 7672): TLS is required and the certificate
  must match them (`outbound/dane.py`).

A pooled connection records what it achieved (`none`, `tls`, `verified`,
`dane`), and is reused only for a delivery whose level it satisfies.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from mailwarden.outbound.dane import DanePolicy

MAY = "may"
TESTING = "testing"
ENCRYPT = "encrypt"
VERIFY = "verify"
DANE = "dane"
MANDATORY = frozenset({ENCRYPT, VERIFY, DANE})

_SATISFIED_BY = {
    MAY: frozenset({"none", "tls", "verified", "dane"}),
    TESTING: frozenset({"none", "tls", "verified", "dane"}),
    ENCRYPT: frozenset({"tls", "verified", "dane"}),
    VERIFY: frozenset({"verified"}),
    DANE: frozenset({"dane"}),
}


class TlsPolicyError(Exception):
    """The TLS the policy requires cannot be had from this host: do not send, defer."""


@dataclass(frozen=True)
class HostPolicy:
    level: str
    source: str = ""  # "dane", "mta-sts" or "" (which policy set the level; for logs and RecipientOutcome.tls)
    dane: DanePolicy | None = None

    @property
    def mandatory(self) -> bool:
        return self.level in MANDATORY


OPPORTUNISTIC = HostPolicy(MAY)


def satisfies(achieved: str, level: str) -> bool:
    """Whether a connection that achieved `achieved` may carry a delivery that needs `level`."""
    return achieved in _SATISFIED_BY[level]


def unverified_context() -> ssl.SSLContext:
    """For `may`, `encrypt` and `dane` (DANE checks the chain itself after the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def verifying_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """For MTA-STS (the MX's certificate, and the policy host's): system CAs plus `delivery.ca_file`."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx
