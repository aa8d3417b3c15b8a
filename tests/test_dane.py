"""DANE (RFC 7672): TLSA matching, and delivery to real Postfix with TLSA records served with (or without) the AD bit."""

from __future__ import annotations

import hashlib
import logging
import ssl
import uuid
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailwarden.outbound import dane
from mailwarden.outbound.dane import DaneError, DanePolicy, Tlsa
from tests.conftest import DnsServer
from tests.remote_mx import MX_ZONE, PolicyServer, RemoteMx, Reply, make_transport, message, policy_text, remote_mx

__all__ = ["remote_mx"]  # the fixture, imported for pytest


def spki(der: bytes) -> bytes:
    return (
        x509.load_der_x509_certificate(der).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )


def tlsa_hex(usage: int, selector: int, mtype: int, der: bytes) -> str:
    data = der if selector == 0 else spki(der)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return f"{usage} {selector} {mtype} {data.hex()}"


# ---- matching ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain() -> tuple[bytes, bytes]:
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.example.test")
    to_der = ssl.PEM_cert_to_DER_cert
    return to_der(leaf.cert_chain_pems[0].bytes().decode()), to_der(ca.cert_pem.bytes().decode())


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_every_selector_and_matching_type(
    chain: tuple[bytes, bytes], selector: int, mtype: int
) -> None:
    leaf, ca = chain
    hexdata = tlsa_hex(3, selector, mtype, leaf).split()[3]
    record = Tlsa(3, selector, mtype, bytes.fromhex(hexdata))
    assert dane.verify(DanePolicy("h", (record,), 1), [leaf], ["anything.test"]) == "dane-ee"  # no name check
    other = Tlsa(3, selector, mtype, bytes.fromhex(tlsa_hex(3, selector, mtype, ca).split()[3]))
    with pytest.raises(DaneError):
        dane.verify(DanePolicy("h", (other,), 1), [leaf], ["mx.example.test"])


def test_dane_ta_needs_the_anchor_in_the_chain_and_the_name(chain: tuple[bytes, bytes]) -> None:
    leaf, ca = chain
    record = Tlsa(2, 0, 1, hashlib.sha256(ca).digest())
    policy = DanePolicy("mx.example.test", (record,), 1)
    assert dane.verify(policy, [leaf, ca], ["mx.example.test"]) == "dane-ta"
    with pytest.raises(DaneError, match="does not verify"):
        dane.verify(policy, [leaf, ca], ["other.example.test"])  # DANE-TA checks the name
    with pytest.raises(DaneError, match="no TLSA record"):
        dane.verify(policy, [leaf], ["mx.example.test"])  # the anchor was not presented


def test_unusable_records_are_left_out() -> None:
    assert not Tlsa(1, 1, 1, b"x").usable  # PKIX-EE: unusable for SMTP (RFC 7672 §3.1.3)
    assert not Tlsa(0, 0, 1, b"x").usable
    assert not Tlsa(3, 2, 1, b"x").usable
    assert not Tlsa(3, 1, 3, b"x").usable
    assert Tlsa(2, 1, 2, b"x").usable and Tlsa(3, 0, 0, b"x").usable


# ---- delivery ----------------------------------------------------------------------


def _zone(remote_mx: RemoteMx, domain: str, mx: str, *tlsa: str) -> str:
    return (
        MX_ZONE
        + f"{domain}. 300 IN MX 10 {mx}.\n"
        + "".join(f"_{remote_mx.port}._tcp.{mx}. 300 IN TLSA {t}\n" for t in tlsa)
    )


def _secure(dns_server: DnsServer, remote_mx: RemoteMx, domain: str, mx: str) -> None:
    dns_server.authenticated |= {domain, mx, f"_{remote_mx.port}._tcp.{mx}"}


async def _send(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx, domain: str, **values: object):
    rcpt = f"u{uuid.uuid4().hex[:10]}@{domain}"
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca, **values)
    try:
        [outcome] = await transport.send("s@origin.test", [rcpt], message("dane", rcpt), domain)
    finally:
        await transport.close()
    return rcpt, outcome


async def test_matching_dane_ee_record_delivers(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add(_zone(remote_mx, "dane.test", "a.mx.test", tlsa_hex(3, 1, 1, remote_mx.good_cert_der)))
    _secure(dns_server, remote_mx, "dane.test", "a.mx.test")
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert outcome.status == "delivered", outcome
    assert outcome.tls.startswith("TLSv1.") and outcome.tls.endswith(" dane-ee")
    remote_mx.wait_messages(rcpt)


async def test_dane_ee_ignores_the_ca(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    # rogue.mx.test's certificate is from an unknown CA: DANE-EE pins the key, not the issuer.
    dns_server.add(_zone(remote_mx, "dane.test", "rogue.mx.test", tlsa_hex(3, 0, 2, remote_mx.rogue_cert_der)))
    _secure(dns_server, remote_mx, "dane.test", "rogue.mx.test")
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert outcome.status == "delivered" and outcome.tls.endswith(" dane-ee"), outcome
    remote_mx.wait_messages(rcpt)


async def test_matching_dane_ta_record_delivers(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    ca_der = ssl.PEM_cert_to_DER_cert(remote_mx.ca.cert_pem.bytes().decode())
    dns_server.add(_zone(remote_mx, "dane.test", "a.mx.test", tlsa_hex(2, 0, 1, ca_der)))
    _secure(dns_server, remote_mx, "dane.test", "a.mx.test")
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert outcome.status == "delivered" and outcome.tls.endswith(" dane-ta"), outcome
    remote_mx.wait_messages(rcpt)


async def test_mismatch_defers_and_nothing_is_sent(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    dns_server.add(_zone(remote_mx, "dane.test", "a.mx.test", tlsa_hex(3, 1, 1, remote_mx.rogue_cert_der)))
    _secure(dns_server, remote_mx, "dane.test", "a.mx.test")
    mark = remote_mx.mark()
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert (outcome.status, outcome.code, outcome.enhanced) == ("deferred", None, "4.7.5")
    assert "does not match its TLSA records" in outcome.text
    stats = remote_mx.wait_log(mark, "disconnect from").split("disconnect from", 1)[1].splitlines()[0]
    assert "starttls=1" in stats and "mail=" not in stats, stats
    assert remote_mx.messages(rcpt) == []
    assert any("event=tls_policy" in r.getMessage() and "policy=dane" in r.getMessage() for r in caplog.records)


async def test_tlsa_without_ad_bit_is_ignored(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    # The same mismatching TLSA record, but not DNSSEC-validated: DANE does not apply, STARTTLS stays opportunistic.
    dns_server.add(_zone(remote_mx, "dane.test", "a.mx.test", tlsa_hex(3, 1, 1, remote_mx.rogue_cert_der)))
    dns_server.authenticated |= {"dane.test", "a.mx.test"}  # everything but the TLSA answer
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert outcome.status == "delivered", outcome
    assert "dane" not in outcome.tls and outcome.tls.startswith("TLSv1.")
    remote_mx.wait_messages(rcpt)


async def test_insecure_mx_answer_means_no_dane(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add(_zone(remote_mx, "dane.test", "a.mx.test", tlsa_hex(3, 1, 1, remote_mx.rogue_cert_der)))
    dns_server.authenticated |= {"a.mx.test", f"_{remote_mx.port}._tcp.a.mx.test"}  # the MX answer is insecure
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert outcome.status == "delivered" and "dane" not in outcome.tls, outcome
    remote_mx.wait_messages(rcpt)


async def test_unusable_tlsa_still_requires_tls(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    # Only a PKIX-EE record (unusable for SMTP): TLS stays mandatory (RFC 7672 §2.2), so a host without STARTTLS defers.
    dns_server.add(_zone(remote_mx, "dane.test", "plain.mx.test", tlsa_hex(1, 1, 1, remote_mx.good_cert_der)))
    _secure(dns_server, remote_mx, "dane.test", "plain.mx.test")
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert (outcome.status, outcome.enhanced) == ("deferred", "4.7.5")
    assert "does not offer STARTTLS" in outcome.text
    assert remote_mx.messages(rcpt) == []


async def test_tlsa_servfail_for_a_secure_host_defers(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    dns_server.add(_zone(remote_mx, "dane.test", "a.mx.test"))
    _secure(dns_server, remote_mx, "dane.test", "a.mx.test")
    dns_server.servfail.add(f"_{remote_mx.port}._tcp.a.mx.test")
    rcpt, outcome = await _send(tmp_path, dns_server, remote_mx, "dane.test")
    assert (outcome.status, outcome.enhanced) == ("deferred", "4.7.5")
    assert "TLSA lookup" in outcome.text
    assert remote_mx.messages(rcpt) == []


async def test_dane_takes_precedence_over_mta_sts(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    # The MTA-STS policy lists only a.mx.test; the MX is rogue.mx.test with a matching DANE-EE record.
    async with PolicyServer(remote_mx.ca, ("dane.test",)) as server:
        dns_server.add(
            server.zone()
            + _zone(remote_mx, "dane.test", "rogue.mx.test", tlsa_hex(3, 1, 1, remote_mx.rogue_cert_der))
            + '_mta-sts.dane.test. 300 IN TXT "v=STSv1; id=1"\n'
        )
        server.replies["mta-sts.dane.test"] = Reply(policy_text("enforce", "a.mx.test"))
        _secure(dns_server, remote_mx, "dane.test", "rogue.mx.test")
        rcpt, outcome = await _send(
            tmp_path, dns_server, remote_mx, "dane.test", **{"delivery.mta_sts_port": server.port}
        )
    assert outcome.status == "delivered" and outcome.tls.endswith(" dane-ee"), outcome
    assert server.requests == []  # MTA-STS was not even consulted
    remote_mx.wait_messages(rcpt)
