"""DANE for SMTP (RFC 7672, RFC 6698): TLSA records say which certificate an MX must present.

DANE only means something when the TLSA answer is DNSSEC-validated. We do not
validate DNSSEC ourselves: the configured resolver (`dns.servers`) is trusted to
do it, and its AD bit is the signal (`DnsResult.authenticated`). So DANE is only
as good as that resolver and the path to it: run a validating resolver on the
same host (unbound, knot-resolver) and list only it in `dns.servers`.

What is implemented (RFC 7672 §3.1):

* usage 3 (DANE-EE): the leaf certificate or its public key matches; no name or
  expiry check (§3.1.1);
* usage 2 (DANE-TA): a certificate the server presents in its chain matches, and
  the leaf chains to it and is valid for the MX host name (§3.1.2, §3.2.2);
* selectors 0 (full certificate) and 1 (SubjectPublicKeyInfo), matching types
  0 (exact), 1 (SHA-256) and 2 (SHA-512).

Usages 0 and 1 (PKIX-TA/PKIX-EE) are unusable for SMTP (§3.1.3). A secure TLSA
RRset with no usable record still makes TLS mandatory, without authentication
(§2.2), as Postfix's "encrypt" level.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from mailwarden.dns.resolver import QueryCounter, Resolver

DANE_TA = 2
DANE_EE = 3
_SELECTORS = (0, 1)
_MATCHING = (0, 1, 2)
_MAX_CHAIN = 10  # certificates looked at in a presented chain
# DANE-TA issuers are often private CAs: the CA certificates must meet the web PKI profile, but the leaf
# only needs a subjectAltName (for the name check), not the CA/Browser Forum's extension rules.
_EE_POLICY = ExtensionPolicy.permit_all().require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)


class DaneError(Exception):
    """The certificate the MX presented does not match its TLSA records."""


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in _SELECTORS and self.mtype in _MATCHING

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}"


@dataclass(frozen=True)
class DanePolicy:
    """DANE applies to `host`. With no usable `records`, TLS is mandatory but not authenticated."""

    host: str
    records: tuple[Tlsa, ...]
    published: int  # TLSA records in the answer, usable or not

    @property
    def authenticates(self) -> bool:
        return bool(self.records)


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host}"


async def lookup(
    resolver: Resolver, host: str, port: int = 25, counter: QueryCounter | None = None
) -> DanePolicy | None:
    """The DANE policy for an MX host whose address records were DNSSEC-secure, or None if DANE does not apply.

    DnsTempError propagates: for a secure host, a failed TLSA lookup leaves the
    DANE status unknown, and RFC 7672 §2.2 says not to deliver to that host then.
    """
    result = await resolver.resolve(tlsa_name(host, port), "TLSA", counter)
    if not result.authenticated or not result.records:
        return None
    records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in result.records)
    return DanePolicy(host, tuple(r for r in records if r.usable), len(records))


def peer_chain(ssl_object: Any) -> list[bytes]:
    """The certificates the server sent (DER), leaf first.

    Python 3.13 has `get_unverified_chain()` on SSLObject; 3.10-3.12 have it on
    the private `_sslobj`. Without either we only get the leaf (DANE-EE still works).
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        inner = getattr(ssl_object, "_sslobj", None)
        getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        out = []
        for cert in chain[:_MAX_CHAIN]:
            out.append(cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
        if out:
            return out
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(record: Tlsa, der: bytes) -> bool:
    """Whether one certificate (DER) matches one TLSA record's selector and matching type."""
    cert = x509.load_der_x509_certificate(der)
    return _digest(_selected(cert, der, record.selector), record.mtype) == record.data


def verify(policy: DanePolicy, chain: Sequence[bytes], names: Sequence[str]) -> str:
    """Check a presented chain (DER, leaf first) against the policy; return "dane-ee" or "dane-ta", else DaneError.

    `names` are the reference identifiers for DANE-TA: the MX host name (RFC 7672 §3.2.2).
    """
    if not chain:
        raise DaneError("the server presented no certificate")
    try:
        leaf_der = chain[0]
        if any(matches(r, leaf_der) for r in policy.records if r.usage == DANE_EE):
            return "dane-ee"
        anchors = [der for der in chain[1:] if any(matches(r, der) for r in policy.records if r.usage == DANE_TA)]
    except ValueError as exc:
        raise DaneError(f"unreadable certificate: {exc}") from None
    if not anchors:
        raise DaneError(f"no TLSA record ({', '.join(map(str, policy.records))}) matches the certificate chain")
    leaf = x509.load_der_x509_certificate(leaf_der)
    intermediates = [x509.load_der_x509_certificate(der) for der in chain[1:]]
    problems: list[str] = []
    for anchor_der in anchors:
        store = Store([x509.load_der_x509_certificate(anchor_der)])
        for name in names:
            builder = (
                PolicyBuilder()
                .store(store)
                .time(datetime.datetime.now(datetime.UTC))
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICY)
            )
            try:
                builder.build_server_verifier(x509.DNSName(name)).verify(leaf, intermediates)
                return "dane-ta"
            except (VerificationError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
    raise DaneError("DANE-TA anchor found but the chain does not verify: " + "; ".join(problems)[:300])
