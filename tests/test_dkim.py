"""DKIM verification against a real DNS server: messages signed here by dkimpy, keys made here."""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dnslib import QTYPE, RR, TXT
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwarden.checks.dkim import DKIMPY_RE_BTAG, RE_BTAG, DkimSignature, evaluate_dkim, split_message
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Tue, 3 Jun 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached.\r\n"
)

# cryptography will not generate an RSA key under 1024 bits any more; this one was made with `openssl genrsa 512`.
RSA_512_PEM = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBOgIBAAJBALRdbDKBIMgnNvtK93EHOs04ME2R26HfkIXkndahLoE1to10RXiW
x5tabiSrW3vVUwErre+PVcIqPwL71H23QzkCAwEAAQJBAK4GKbv9DSUxeQIzTdW3
lQum+CwP3Gst6yLU91m8AMPW8JqOuLNHQLnkxX1SEQ8AZfBIYpbjOctykAExlsm8
FFECIQDoLUppvOVT7G0/HO96h76cquKcLr5+WLmJ9tsIlkwJ/QIhAMbfKQHRTeo8
SWACQg+xfzBGk2vBNIeIKLLMIXoKp1TtAiAminYizU+IOeP8qRH71hLHMPrDEGNg
19uc0lSTvVdMBQIgEf0NkISGL7HUUULjBthfUNaRbyXCwp+mTsX4ITnleOECICcv
UVMNXIjAG1e5PU3UzAJfBHoR9UXDdEmI1kvB4FzL
-----END RSA PRIVATE KEY-----
"""


@dataclass(frozen=True)
class Key:
    algorithm: bytes  # dkimpy's a=
    private: bytes  # what dkim.sign takes
    record: str  # the TXT record to publish


def rsa_key(private: rsa.RSAPrivateKey) -> Key:
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(b"rsa-sha256", pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode())


def ed25519_key() -> Key:
    private = ed25519.Ed25519PrivateKey.generate()
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # RFC 8463 §4.2: p= is the raw 32-byte public key, base64.
    return Key(b"ed25519-sha256", base64.b64encode(seed), "v=DKIM1; k=ed25519; p=" + base64.b64encode(public).decode())


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "rsa2048": rsa_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "rsa1024": rsa_key(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "rsa512": rsa_key(serialization.load_pem_private_key(RSA_512_PEM, None)),  # type: ignore[arg-type]
        "ed": ed25519_key(),
        "other": rsa_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }


def publish(dns_server: DnsServer, name: str, record: str) -> None:
    data = record.encode()
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)]  # one record, several strings (RFC 7208 §3.3)
    dns_server.records.append(RR(name + ".", QTYPE.TXT, rdata=TXT(chunks), ttl=300))


def sign(message: bytes, key: Key, selector: str, domain: str = "example.test", **kwargs: object) -> bytes:
    header = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private,
        signature_algorithm=key.algorithm,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        **kwargs,  # type: ignore[arg-type]
    )
    return header + message


@pytest.fixture
def resolver(dns_server: DnsServer, keys: dict[str, Key]) -> Resolver:
    for selector, key in keys.items():
        if selector != "other":  # "other" signs, but its key is never published
            publish(dns_server, f"{selector}._domainkey.example.test", key.record)
    publish(dns_server, "other._domainkey.example.test", keys["rsa2048"].record)  # a selector with the wrong key
    return Resolver([dns_server.address], timeout=1.0)


def only(result_details: dict) -> DkimSignature:
    [signature] = result_details["signatures"]
    return signature


@pytest.mark.parametrize(("selector", "bits"), [("rsa2048", 2048), ("rsa1024", 1024), ("ed", 256)])
async def test_rsa_and_ed25519_signatures_pass(
    keys: dict[str, Key], resolver: Resolver, selector: str, bits: int
) -> None:
    signed = sign(MESSAGE, keys[selector], selector)
    result = await evaluate_dkim(signed, resolver)
    assert result.check == "dkim" and result.result == "pass", result.reason
    sig = only(result.details)
    assert (sig.domain, sig.selector, sig.algorithm, sig.key_bits) == (
        "example.test",
        selector,
        keys[selector].algorithm.decode(),
        bits,
    )
    b_tag = dkim.util.parse_tag_value(signed.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:", 1)[1])[b"b"]
    assert sig.header_b == b"".join(b_tag.split())[:8].decode()
    assert result.auth_results == (sig.auth_result(),)
    assert sig.auth_result().startswith(f"dkim=pass header.d=example.test header.s={selector} header.b=")
    assert result.details["passing_domains"] == ["example.test"]
    assert result.details["results"] == [("pass", "example.test")]
    assert result.dns_lookups == 1


async def test_each_signature_is_reported_and_one_good_one_passes(keys: dict[str, Key], resolver: Resolver) -> None:
    signed = sign(sign(MESSAGE, keys["ed"], "ed"), keys["other"], "other", domain="example.test")
    result = await evaluate_dkim(signed, resolver)
    assert result.result == "pass"
    first, second = result.details["signatures"]
    assert (first.selector, first.result) == ("other", "fail")  # the newest signature comes first
    assert "does not verify" in first.reason
    assert (second.selector, second.result) == ("ed", "pass")
    assert [e.split()[0] for e in result.auth_results] == ["dkim=fail", "dkim=pass"]
    assert result.details["results"] == [("fail", "example.test"), ("pass", "example.test")]


async def test_tampered_body_fails(keys: dict[str, Key], resolver: Resolver) -> None:
    signed = sign(MESSAGE, keys["rsa2048"], "rsa2048").replace(b"attached", b"ATTACHED")
    result = await evaluate_dkim(signed, resolver)
    assert result.result == "fail"
    assert "body hash mismatch" in only(result.details).reason
    assert result.details["passing_domains"] == []


async def test_tampered_signed_header_fails(keys: dict[str, Key], resolver: Resolver) -> None:
    signed = sign(MESSAGE, keys["ed"], "ed").replace(b"quarterly numbers", b"wire the money")
    result = await evaluate_dkim(signed, resolver)
    assert result.result == "fail"


async def test_l_tag_with_appended_content_is_policy_never_pass(keys: dict[str, Key], resolver: Resolver) -> None:
    signed = sign(MESSAGE, keys["rsa2048"], "rsa2048", length=True)
    exact = await evaluate_dkim(signed, resolver)
    assert exact.result == "pass", exact.reason  # l= covering the whole body is fine

    appended = signed + b"\r\nClick here: https://phish.example/\r\n"
    result = await evaluate_dkim(appended, resolver)
    assert result.result == "policy"
    sig = only(result.details)
    assert sig.body_length is not None
    assert f"l={sig.body_length}" in sig.reason and "body bytes" in sig.reason
    assert result.auth_results[0].startswith("dkim=policy ")
    assert result.details["passing_domains"] == []


async def test_rsa_key_under_1024_bits_is_not_a_pass(keys: dict[str, Key], resolver: Resolver) -> None:
    result = await evaluate_dkim(sign(MESSAGE, keys["rsa512"], "rsa512"), resolver)
    assert result.result == "policy"
    sig = only(result.details)
    assert sig.key_bits == 512 and "1024" in sig.reason


async def test_servfail_on_the_key_is_temperror(
    dns_server: DnsServer, keys: dict[str, Key], resolver: Resolver
) -> None:
    dns_server.servfail.add("rsa2048._domainkey.example.test")
    result = await evaluate_dkim(sign(MESSAGE, keys["rsa2048"], "rsa2048"), resolver)
    assert result.result == "temperror"
    assert "SERVFAIL" in only(result.details).reason


async def test_temperror_outranks_a_failure(dns_server: DnsServer, keys: dict[str, Key], resolver: Resolver) -> None:
    dns_server.servfail.add("ed._domainkey.example.test")
    signed = sign(sign(MESSAGE, keys["ed"], "ed"), keys["other"], "other")
    result = await evaluate_dkim(signed, resolver)
    assert [s.result for s in result.details["signatures"]] == ["fail", "temperror"]
    assert result.result == "temperror"  # a retry may still pass


async def test_missing_and_revoked_keys_are_permerror(
    dns_server: DnsServer, keys: dict[str, Key], resolver: Resolver
) -> None:
    missing = await evaluate_dkim(sign(MESSAGE, keys["rsa2048"], "gone"), resolver)
    assert missing.result == "permerror" and "no key" in only(missing.details).reason
    publish(dns_server, "revoked._domainkey.example.test", "v=DKIM1; k=rsa; p=")
    revoked = await evaluate_dkim(sign(MESSAGE, keys["rsa2048"], "revoked"), resolver)
    assert revoked.result == "permerror" and "revoked" in only(revoked.details).reason


async def test_unsigned_message_is_none(resolver: Resolver) -> None:
    result = await evaluate_dkim(MESSAGE, resolver)
    assert (result.result, result.auth_results, result.details["signatures"]) == ("none", ("dkim=none",), [])


HOSTILE = [
    b"",
    b"\x00\xff\xfe garbage",
    b" starts with a continuation\r\nFrom: a@example.test\r\n\r\nbody",
    b"From: a@example.test\r\nthis line has no colon\r\n\r\nbody",
    b"DKIM-Signature: \r\nFrom: a@example.test\r\n\r\nbody",
    b"DKIM-Signature: ;;;===;\r\nFrom: a@example.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa2048; h=from; bh=!!!; b=not base64 at all\r\n"
    b"From: a@example.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa2048; h=from; bh=AAAA; b=AAA\r\n"
    b"From: a@example.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.test; s=ed; h=from; bh=AAAA; b=AAAA\r\n"
    b"From: a@example.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa2048; h=from; bh=AAAA; b=AAAA; i=x; l=99999999999999\r\n"
    b"From: a@example.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=\xff\xfe; s=..; h=from; bh=AAAA; b=AAAA\r\nFrom: a\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=a\r\n\tb; s=x y; h=from; bh=AAAA; b=AAAA\r\nFrom: a\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=" + b"a" * 70_000 + b"; s=x; h=from; bh=AAAA; b=AAAA\r\nFrom: a\r\n\r\n",
    b"X-Huge: " + b"x" * 2_000_000 + b"\r\nFrom: a@example.test\r\n\r\nbody",
    b"X-Folded: a\r\n" + b" b\r\n" * 200_000 + b"From: a@example.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; d=example.test; s=rsa2048; h=from; bh=AAAA; b=AAAA; a=rsa-sha256\r\n" * 30
    + b"From: a@example.test\r\n\r\nbody",
]


@pytest.mark.parametrize("message", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_input_never_raises(resolver: Resolver, message: bytes) -> None:
    result = await evaluate_dkim(message, resolver)
    assert result.result in {"none", "fail", "permerror", "neutral", "policy", "temperror"}
    assert len(result.details["signatures"]) <= 30
    for entry in result.auth_results:
        assert "\r" not in entry and "\n" not in entry and len(entry) < 1000


async def test_random_mutations_of_a_signed_message_never_raise(keys: dict[str, Key], resolver: Resolver) -> None:
    signed = sign(MESSAGE, keys["ed"], "ed")
    rng = random.Random(8463)
    for _ in range(200):
        data = bytearray(signed)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        result = await evaluate_dkim(bytes(data), resolver)
        assert result.result in {"pass", "none", "fail", "permerror", "neutral", "policy", "temperror"}


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"A: b\r\n c\r\n\td\nE:f\n\nx\ny\n",
        b"From x\nA: b\n\nbody",
        b"A: b",
        MESSAGE,
        b"\r\nA: b\r\n\r\nbody\r\n",  # starts with the blank line
        b"A: b\r\n\r\n\r\nbody\r\n\r\n",  # CRLF only: the fast path
        b"A: b\r\n\r\nbody\nwith a bare LF\r\n",  # one bare LF: the general path
    ],
)
def test_split_message_matches_dkimpy(message: bytes) -> None:
    assert split_message(message) == tuple(dkim.rfc822_parse(message))


def test_openssl_rsa_verification_agrees_with_dkimpy_pure_python(keys: dict[str, Key]) -> None:
    """evaluate_dkim swaps dkimpy's big-integer RSA for OpenSSL's; both must give the same answers."""
    import hashlib

    from mailwarden.checks import dkim as ours

    for name in ("rsa2048", "rsa1024"):
        private = serialization.load_pem_private_key(keys[name].private, None)
        numbers = private.public_key().public_numbers()  # type: ignore[union-attr]
        public = {"modulus": numbers.n, "publicExponent": numbers.e}
        for algo, sign_hash in (("sha256", hashes.SHA256()), ("sha1", hashes.SHA1())):
            data = b"canonicalized headers and body hash"
            signature = private.sign(data, padding.PKCS1v15(), sign_hash)  # type: ignore[union-attr]
            for sig, payload in ((signature, data), (signature, data + b"!"), (bytes(len(signature)), data)):
                expected = ours._PURE_PYTHON_VERIFY(hashlib.new(algo, payload), sig, public)
                assert ours._openssl_rsa_verify(hashlib.new(algo, payload), sig, public) is expected
            assert ours._openssl_rsa_verify(hashlib.new(algo, data), signature, public) is True


async def test_large_messages_are_verified_off_the_event_loop_with_the_same_result(
    keys: dict[str, Key], resolver: Resolver
) -> None:
    """Over checks/offload.INLINE_LIMIT the work moves to a thread; the verdict must not change."""
    from mailwarden.checks.offload import INLINE_LIMIT

    big = MESSAGE + b"".join(b"line %06d of a long report\r\n" % i for i in range(INLINE_LIMIT // 20))
    assert len(big) > INLINE_LIMIT
    good = await evaluate_dkim(sign(big, keys["rsa2048"], "rsa2048"), resolver)
    assert good.result == "pass", good.reason
    tampered = sign(big, keys["rsa2048"], "rsa2048").replace(b"line 000001", b"line 999999")
    assert (await evaluate_dkim(tampered, resolver)).result == "fail"


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"b",
                b"=",
                b";",
                b" ",
                b"\t",
                b"\r",
                b"\n",
                b"\r\n",
                b"A",
                b"z",
                b"9",
                b"+",
                b"/",
                b"h",
                b":",
                b"-",
                b" b=",
                b"; b= ",
            ]
        ),
        max_size=60,
    )
)
def test_faster_b_tag_blanking_matches_dkimpy(parts: list[bytes]) -> None:
    """The signature field is hashed with b= blanked; our faster regex must blank exactly what dkimpy's does."""
    value = b"".join(parts)
    assert RE_BTAG.sub(rb"\1", value) == DKIMPY_RE_BTAG.sub(rb"\1", value)
