"""ARC sealing of forwarded mail: an alias to an outside address gets our ARC set, which verifies."""

from __future__ import annotations

import asyncio
import re
import smtplib

import pytest

from mailwarden.checks.arc import evaluate_arc
from mailwarden.dns.resolver import Resolver
from mailwarden.outbound.arc_seal import SealError, seal
from mailwarden.outbound.dkim_keys import new_key_set, rsa_key, zone_lines
from tests.conftest import BOB, DnsServer, RunningServer
from tests.test_dkim import ed25519_key, publish, sign

ZONE = """
news.test. 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.news.test. 300 IN TXT "v=DMARC1; p=reject"
"""
FORWARD = "fwd@example.test"
OUTSIDE = "friend@elsewhere.test"


@pytest.fixture
def forwarding(server_factory, dns_server: DnsServer) -> RunningServer:  # type: ignore[no-untyped-def]
    """An MX that checks loopback clients too, with an alias that forwards outside, and its keys in DNS."""
    dns_server.add(ZONE)
    server = server_factory({"inbound.trusted_networks": []})
    code, _, err = server.cli("alias", "add", FORWARD, OUTSIDE)
    assert code == 0, err
    code, out, err = server.cli("dkim", "show", "example.test")
    assert code == 0, err
    for name, value in published(out):
        publish(dns_server, name, value)
    return server


def published(zone_text: str) -> list[tuple[str, str]]:
    """(name, TXT value) from `dkim show` output, as an administrator would paste it into a zone."""
    found = []
    for line in zone_text.splitlines():
        m = re.match(r"(\S+)\. IN TXT \( (.*) \)$", line)
        if m:
            found.append((m.group(1), "".join(re.findall(r'"([^"]*)"', m.group(2)))))
    return found


def send(server: RunningServer, rcpt: str, data: bytes) -> int:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("mx.news.test")
        c.starttls(context=server.tls.client_context())
        c.ehlo("mx.news.test")
        c.mail("bounce@news.test")
        assert c.rcpt(rcpt)[0] == 250
        return c.data(data)[0]


def newsletter(dns_server: DnsServer) -> bytes:
    key = ed25519_key()
    publish(dns_server, "k1._domainkey.news.test", key.record)
    body = (
        f"From: News <letters@news.test>\r\nTo: {FORWARD}\r\nSubject: issue 7\r\n"
        "Date: Mon, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <n7@news.test>\r\n\r\nhello\r\n"
    ).encode()
    return sign(body, key, "k1", domain="news.test")


def queued_body(server: RunningServer) -> bytes:
    server.wait_filed()
    entries = server.call(server.server.store.list_queue())
    assert [e.recipient for e in entries] == [OUTSIDE]
    return server.call(server.server.store.read_blob(entries[0].blob))


def arc_verdict(dns_server: DnsServer, message: bytes):  # type: ignore[no-untyped-def]
    return asyncio.run(evaluate_arc(message, Resolver([dns_server.address], timeout=2)))


def test_forwarded_mail_is_sealed_and_the_seal_verifies(forwarding: RunningServer, dns_server: DnsServer) -> None:
    assert send(forwarding, FORWARD, newsletter(dns_server)) == 250
    forwarded = queued_body(forwarding)
    head = forwarded.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.test;")
    assert "ARC-Message-Signature: i=1;" in head
    assert "ARC-Authentication-Results: i=1; mail.example.test;" in head and "dmarc=pass" in head
    # The next hop, with the keys `dkim show` told the administrator to publish, validates the chain.
    verdict = arc_verdict(dns_server, forwarded)
    assert (verdict.result, verdict.details["sealers"]) == ("pass", ["example.test"])


def test_local_copies_are_not_sealed(forwarding: RunningServer, dns_server: DnsServer) -> None:
    assert send(forwarding, BOB, newsletter(dns_server)) == 250
    assert b"ARC-Seal:" not in forwarding.message(BOB, 1)
    assert forwarding.call(forwarding.server.store.list_queue()) == []


def test_a_chain_that_arrived_valid_is_continued_with_cv_pass(forwarding: RunningServer, dns_server: DnsServer) -> None:
    # A mailing list sealed the message before it reached us (hop 1).
    keys = new_key_set("lists.test")
    for name, value in published("\n".join(zone_lines(keys))):
        publish(dns_server, name, value)
    signed = newsletter(dns_server)
    ar = b"Authentication-Results: lists.test; spf=pass smtp.mailfrom=news.test; dmarc=pass header.from=news.test\r\n"
    listed = seal(ar + signed, rsa_key(keys), "lists.test") + ar + signed  # type: ignore[arg-type]
    assert send(forwarding, FORWARD, listed) == 250
    forwarded = queued_body(forwarding)
    assert forwarded.startswith(b"ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=example.test;")
    verdict = arc_verdict(dns_server, forwarded)
    assert (verdict.result, verdict.details["sealers"]) == ("pass", ["example.test", "lists.test"])


def test_a_message_without_our_authentication_results_is_not_sealed() -> None:
    key = rsa_key(new_key_set("example.test"))
    message = b"From: a@news.test\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(SealError, match="no Authentication-Results"):
        seal(message, key, "mail.example.test")  # type: ignore[arg-type]


def test_dkim_show_prints_both_keys_of_a_new_domain(forwarding: RunningServer) -> None:
    code, out, err = forwarding.cli("domain", "add", "second.test")
    assert code == 0, err
    code, out, err = forwarding.cli("dkim", "show", "second.test")
    assert code == 0, err
    names = [name for name, _ in published(out)]
    assert len(names) == 2 and all(n.endswith("._domainkey.second.test") for n in names)
    values = [value for _, value in published(out)]
    assert {v.split(";")[1].strip() for v in values} == {"k=rsa", "k=ed25519"}
    code, _, err = forwarding.cli("dkim", "show", "unknown.test")
    assert code != 0 and "not a hosted domain" in err
