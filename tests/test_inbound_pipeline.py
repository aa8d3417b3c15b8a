"""The data stage end to end: SPF + DKIM + ARC + DMARC through a real DNS server, one verdict,
one Authentication-Results header, and `mailwarden inspect` explaining it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailwarden.checks.result import Action
from mailwarden.dns.resolver import Resolver
from mailwarden.pipeline.auth_results import strip_claimed_auth_results
from mailwarden.pipeline.inbound import InboundEnvelope, InboundPolicy, evaluate_message
from tests.conftest import DnsServer, run_cli
from tests.test_dkim import ed25519_key, publish, sign

AUTHSERV = "mx.ours.test"
ZONE = """
sender.test. 300 IN TXT "v=spf1 ip4:192.0.2.10 -all"
_dmarc.sender.test. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@sender.test"
bank.test. 300 IN TXT "v=spf1 ip4:198.51.100.1 -all"
_dmarc.bank.test. 300 IN TXT "v=DMARC1; p=reject"
attacker.test. 300 IN TXT "v=spf1 ip4:203.0.113.66 -all"
"""


def message(from_header: str, extra: str = "") -> bytes:
    return (
        f"{extra}From: {from_header}\r\nTo: bob@ours.test\r\nSubject: statement\r\n"
        "Date: Mon, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m1@sender.test>\r\n\r\nHello.\r\n"
    ).encode()


@pytest.fixture
def resolver(dns_server: DnsServer) -> Resolver:
    dns_server.add(ZONE)
    return Resolver([dns_server.address], timeout=1.0)


POLICY = InboundPolicy(authserv_id=AUTHSERV, local_domains=frozenset({"ours.test"}))


async def test_aligned_signed_mail_passes_with_one_header(dns_server: DnsServer, resolver: Resolver) -> None:
    key = ed25519_key()
    publish(dns_server, "sel._domainkey.sender.test", key.record)
    signed = sign(message("Sender <news@sender.test>"), key, "sel", domain="sender.test")
    env = InboundEnvelope("192.0.2.10", "mail.sender.test", "bounce@sender.test")
    verdict, out = await evaluate_message(signed, env, resolver, POLICY)
    assert verdict.action is Action.NONE and verdict.smtp_reply() is None
    header = verdict.header.decode()
    assert header.startswith(f"Authentication-Results: {AUTHSERV};")
    for entry in ("spf=pass smtp.mailfrom=sender.test", "dkim=pass header.d=sender.test", "dmarc=pass"):
        assert entry in header
    assert out.startswith(verdict.header) and out.count(b"Authentication-Results:") == 1


async def test_dmarc_reject_forgery_is_refused_with_550(resolver: Resolver) -> None:
    env = InboundEnvelope("203.0.113.66", "mx.attacker.test", "x@attacker.test")
    verdict, _ = await evaluate_message(message("Bank <alerts@bank.test>"), env, resolver, POLICY)
    assert verdict.action is Action.REJECT
    reply = verdict.smtp_reply()
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.7.1") and "dmarc" in reply.text
    assert "dmarc=fail" in verdict.header.decode()


@pytest.mark.parametrize(
    "from_header",
    [
        "alerts@bank.test\r\nFrom: other@attacker.test",
        "alerts@bank.test, x@attacker.test",
        '"ceo@ours.test" <x@attacker.test>',
        "=?utf-8?q?alerts=40bank.test?=",
        "alerts@bank.test (x@attacker.test)",
        "<@relay.test:alerts@bank.test>",
    ],
    ids=["two-from", "two-addresses", "display-name-ceo", "encoded-word", "comment", "route"],
)
async def test_spoofing_never_yields_a_pass(resolver: Resolver, from_header: str) -> None:
    env = InboundEnvelope("203.0.113.66", "mx.attacker.test", "x@attacker.test")
    verdict, _ = await evaluate_message(message(from_header), env, resolver, POLICY)
    assert verdict.action is Action.REJECT or "dmarc=fail" in verdict.header.decode()
    assert "dmarc=pass" not in verdict.header.decode()


async def test_display_name_showing_a_foreign_address_scores(resolver: Resolver) -> None:
    env = InboundEnvelope("203.0.113.66", "mx.attacker.test", "x@attacker.test")
    verdict, _ = await evaluate_message(message('"alerts@bank.test" <x@attacker.test>'), env, resolver, POLICY)
    assert verdict.score == 2.0 and any("display name shows alerts@bank.test" in r for r in verdict.reasons)
    assert "dmarc=pass" not in verdict.header.decode()


async def test_forged_auth_results_claiming_us_are_removed(resolver: Resolver) -> None:
    forged = (
        f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=bank.test;\r\n\tdmarc=pass\r\n"
        "Authentication-Results: other.example; spf=pass\r\n"
    )
    env = InboundEnvelope("192.0.2.10", "mail.sender.test", "bounce@sender.test")
    verdict, out = await evaluate_message(message("news@sender.test", extra=forged), env, resolver, POLICY)
    assert verdict.removed_forgeries == 1
    assert b"dkim=pass header.d=bank.test" not in out
    assert b"Authentication-Results: other.example; spf=pass" in out


def test_strip_matches_authserv_id_case_insensitively_and_through_comments() -> None:
    msg = b"Authentication-Results: (c) MX.OURS.TEST (x); none\r\nSubject: s\r\n\r\nb\r\n"
    stripped, n = strip_claimed_auth_results(msg, AUTHSERV)
    assert (stripped, n) == (b"Subject: s\r\n\r\nb\r\n", 1)


async def test_dns_outage_on_dmarc_is_a_tempfail(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.servfail.add("_dmarc.bank.test")
    env = InboundEnvelope("198.51.100.1", "mx.bank.test", "alerts@bank.test")
    verdict, _ = await evaluate_message(message("alerts@bank.test"), env, resolver, POLICY)
    assert verdict.action is Action.TEMPFAIL
    reply = verdict.smtp_reply()
    assert reply is not None and reply.code == 451


def test_inspect_explains_a_rejection(dns_server: DnsServer, tmp_path: Path) -> None:
    dns_server.add(ZONE)
    path = tmp_path / "forgery.eml"
    path.write_bytes(message("Bank <alerts@bank.test>").replace(b"\r\n", b"\n"))  # files on disk often use LF
    args = ["--dir", str(tmp_path), "inspect", str(path), "--ip", "203.0.113.66", "--helo", "mx.attacker.test"]
    args += ["--mail-from", "x@attacker.test", "--dns", f"{dns_server.host}:{dns_server.port}"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert out.startswith("Verdict: reject") and "550 5.7.1" in out
    assert "dmarc  fail" in out and "Authentication-Results:" in out
    code, out, err = run_cli(*args, "--json")
    data = json.loads(out)
    assert data["action"] == "reject"
    assert {c["check"]: c["result"] for c in data["checks"]}["dmarc"] == "fail"
