"""ARC: sealing with `arc_seal`, then validating what we sealed through a real DNS server."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RR, TXT

from mailwarden.checks.arc import ArcSealRefused, arc_seal, evaluate_arc
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

MESSAGE = (
    b"From: Alice <alice@origin.test>\r\n"
    b"To: list@lists.test\r\n"
    b"Subject: meeting\r\n"
    b"Date: Tue, 3 Jun 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1@origin.test>\r\n"
    b"\r\n"
    b"See you at ten.\r\n"
)


@pytest.fixture(scope="module")
def private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


@pytest.fixture
def resolver(dns_server: DnsServer, private_pem: bytes) -> Resolver:
    public = serialization.load_pem_private_key(private_pem, None).public_key()
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = ("v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()).encode()
    for domain in ("lists.test", "relay.test"):
        chunks = [record[i : i + 255] for i in range(0, len(record), 255)]
        dns_server.records.append(RR(f"arc._domainkey.{domain}.", QTYPE.TXT, rdata=TXT(chunks), ttl=300))
    return Resolver([dns_server.address], timeout=1.0)


def seal(message: bytes, results: str, domain: str, pem: bytes) -> bytes:
    return arc_seal(message, results, domain=domain, selector="arc", private_key_pem=pem, srv_id=f"mx.{domain}")


async def test_sealed_message_passes_and_names_its_sealer(resolver: Resolver, private_pem: bytes) -> None:
    sealed = seal(MESSAGE, "spf=pass smtp.mailfrom=origin.test; dkim=none; arc=none", "lists.test", private_pem)
    assert sealed.startswith(b"ARC-Seal: ") and sealed.endswith(MESSAGE)
    assert b"ARC-Authentication-Results: i=1; mx.lists.test; spf=pass smtp.mailfrom=origin.test;" in sealed

    result = await evaluate_arc(sealed, resolver, remote_ip="192.0.2.7")
    assert (result.check, result.result, result.details["cv"]) == ("arc", "pass", "pass")
    assert result.details["sealers"] == ["lists.test"]
    assert result.auth_results == ("arc=pass (i=1 d=lists.test) smtp.remote-ip=192.0.2.7",)
    assert result.details["trusted_override"] is False
    trusted = await evaluate_arc(sealed, resolver, trusted_sealers=["Lists.Test."])
    assert trusted.details["trusted_override"] is True


async def test_two_hops_pass_and_the_newest_sealer_decides_trust(resolver: Resolver, private_pem: bytes) -> None:
    hop1 = seal(MESSAGE, "arc=none", "lists.test", private_pem)
    hop2 = seal(hop1, "arc=pass; dkim=fail", "relay.test", private_pem)
    result = await evaluate_arc(hop2, resolver, trusted_sealers={"lists.test"})
    assert result.result == "pass", result.reason
    assert result.details["sealers"] == ["relay.test", "lists.test"]
    assert [i.instance for i in result.details["instances"]] == [2, 1]
    assert result.auth_results[0].startswith("arc=pass (i=2 d=relay.test)")
    assert result.details["trusted_override"] is False  # only the most recent sealer counts
    assert (await evaluate_arc(hop2, resolver, trusted_sealers={"relay.test"})).details["trusted_override"] is True


async def test_changed_body_after_sealing_fails(resolver: Resolver, private_pem: bytes) -> None:
    sealed = seal(MESSAGE, "arc=none", "lists.test", private_pem).replace(b"ten.", b"eleven.")
    result = await evaluate_arc(sealed, resolver, trusted_sealers={"lists.test"})
    assert (result.result, result.details["trusted_override"]) == ("fail", False)
    assert result.auth_results == ("arc=fail",)


async def test_no_chain_is_none(resolver: Resolver) -> None:
    result = await evaluate_arc(MESSAGE, resolver)
    assert (result.result, result.auth_results, result.details["sealers"]) == ("none", ("arc=none",), [])


async def test_servfail_on_a_sealer_key_is_temperror(
    dns_server: DnsServer, resolver: Resolver, private_pem: bytes
) -> None:
    sealed = seal(MESSAGE, "arc=none", "lists.test", private_pem)
    dns_server.servfail.add("arc._domainkey.lists.test")
    result = await evaluate_arc(sealed, resolver)
    assert result.result == "temperror"
    assert "temporarily" in result.reason


def test_sealing_refuses_where_rfc_8617_says_not_to(private_pem: bytes) -> None:
    hop1 = seal(MESSAGE, "arc=none", "lists.test", private_pem)
    with pytest.raises(ArcSealRefused, match="no arc= result"):
        seal(hop1, "spf=pass smtp.mailfrom=origin.test", "relay.test", private_pem)
    failed = seal(hop1, "arc=fail", "relay.test", private_pem)
    assert b"cv=fail" in failed.split(b"\r\n\r\n")[0]
    with pytest.raises(ArcSealRefused, match="cv=fail"):
        seal(failed, "arc=fail", "relay.test", private_pem)
    with pytest.raises(ValueError):
        arc_seal(
            MESSAGE, "a=b\r\nInjected: yes", domain="x.test", selector="s", private_key_pem=private_pem, srv_id="x"
        )


HOSTILE = [
    b"",
    b"\xff\xfe\x00",
    b" leading continuation\r\nARC-Seal: i=1\r\n\r\n",
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=lists.test; s=arc; b=AAAA\r\nFrom: a\r\n\r\nbody",
    b"ARC-Seal: i=1;a=rsa-sha256; cv=none; d=lists.test; s=arc; b=AAAA\r\n"
    b"ARC-Message-Signature:i=1;a=rsa-sha256; d=lists.test; s=arc; h=from; bh=AAAA; b=AAAA\r\n"
    b"ARC-Authentication-Results: i=1; x; arc=none\r\nFrom: a\r\n\r\nbody",
    b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=lists.test; s=arc; b=AAAA\r\nFrom: a\r\n\r\nbody",
    b"ARC-Seal: i=1; i=1; ;;==\r\nARC-Message-Signature: i=1; garbage\r\nARC-Authentication-Results: i=1\r\n\r\n",
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=\xff; s=\x00; b=!!!\r\n\r\n",
    b"ARC-Seal: i=99999999999999999999999; cv=none\r\n\r\n",
]


@pytest.mark.parametrize("message", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_input_never_raises(resolver: Resolver, message: bytes) -> None:
    result = await evaluate_arc(message, resolver, trusted_sealers={"lists.test"})
    assert result.result in {"none", "fail"}
    assert result.details["trusted_override"] is False
