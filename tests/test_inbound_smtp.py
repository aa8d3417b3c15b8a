"""Inbound checks over real SMTP: the verdict decides the reply and the folder."""

from __future__ import annotations

import smtplib
import urllib.request

import pytest

from tests.conftest import BOB, DnsServer, RunningServer
from tests.test_dkim import ed25519_key, publish, sign

ZONE = """
bank.test. 300 IN TXT "v=spf1 ip4:198.51.100.1 -all"
_dmarc.bank.test. 300 IN TXT "v=DMARC1; p=reject"
shop.test. 300 IN TXT "v=spf1 ip4:198.51.100.2 -all"
_dmarc.shop.test. 300 IN TXT "v=DMARC1; p=quarantine"
attacker.test. 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
news.test. 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.news.test. 300 IN TXT "v=DMARC1; p=reject"
"""


@pytest.fixture
def checked(server_factory, dns_server: DnsServer) -> RunningServer:  # type: ignore[no-untyped-def]
    """A server that runs the inbound checks on loopback clients too."""
    dns_server.add(ZONE)
    return server_factory({"inbound.trusted_networks": []})


def message(from_header: str, extra: str = "") -> bytes:
    return (
        f"{extra}From: {from_header}\r\nTo: {BOB}\r\nSubject: hello\r\nDate: Mon, 1 Jan 2026 00:00:00 +0000\r\n"
        "Message-ID: <m@x.test>\r\n\r\nbody\r\n"
    ).encode()


def send(server: RunningServer, sender: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("mx.sender.test")
        c.starttls(context=server.tls.client_context())
        c.ehlo("mx.sender.test")
        c.mail(sender)
        assert c.rcpt(BOB)[0] == 250
        return c.data(data)


def test_dmarc_reject_forgery_is_refused_after_data(checked: RunningServer) -> None:
    code, text = send(checked, "x@attacker.test", message("Bank <alerts@bank.test>"))
    assert (code, text[:5]) == (550, b"5.7.1") and b"dmarc" in text
    assert checked.inbox(BOB) == [] and checked.inbox(BOB, "Junk") == []


def test_dmarc_quarantine_goes_to_junk(checked: RunningServer) -> None:
    code, _ = send(checked, "x@attacker.test", message("Shop <orders@shop.test>"))
    assert code == 250
    assert checked.inbox(BOB) == []
    assert [r[2] for r in checked.inbox(BOB, "Junk")] == ["Shop <orders@shop.test>"]


def test_aligned_signed_mail_is_delivered_with_our_authentication_results(
    checked: RunningServer, dns_server: DnsServer
) -> None:
    key = ed25519_key()
    publish(dns_server, "k1._domainkey.news.test", key.record)
    forged = "Authentication-Results: mail.example.test; dmarc=pass header.from=bank.test\r\n"
    signed = sign(message("News <letters@news.test>"), key, "k1", domain="news.test")
    code, _ = send(checked, "bounce@news.test", forged.encode() + signed)
    assert code == 250
    raw = checked.message(BOB, 1).decode()
    head = raw.split("\r\n\r\n", 1)[0]
    assert head.count("Authentication-Results:") == 1  # ours; the forgery claiming our authserv-id is gone
    assert "Authentication-Results: mail.example.test;\r\n\tspf=pass smtp.mailfrom=news.test" in head
    assert "dkim=pass header.d=news.test" in head and "dmarc=pass" in head
    assert "header.from=bank.test" not in head


def test_dns_outage_defers_instead_of_guessing(checked: RunningServer, dns_server: DnsServer) -> None:
    dns_server.servfail.add("_dmarc.bank.test")
    code, text = send(checked, "alerts@bank.test", message("alerts@bank.test"))
    assert code == 451 and text.startswith(b"4.7.1")


def test_submission_and_trusted_networks_skip_the_sender_checks(server: RunningServer, dns_server: DnsServer) -> None:
    dns_server.add(ZONE)  # default test servers trust loopback
    code, _ = send(server, "x@attacker.test", message("Bank <alerts@bank.test>"))
    assert code == 250
    assert "Authentication-Results" not in server.message(BOB, 1).decode()


BLOCKLIST = """
2.0.0.127.zen.test. 300 IN A 127.0.0.2
bad-domain.test.dbl.test. 300 IN A 127.0.1.2
test.dbl.test. 300 IN A 127.0.1.2
"""
ZONES = [
    {"preset": "spamhaus-zen", "name": "zen.test"},
    {"preset": "spamhaus-dbl", "name": "dbl.test"},
]


def test_listed_client_is_refused_at_rcpt_naming_the_zone(server_factory, dns_server: DnsServer) -> None:  # type: ignore[no-untyped-def]
    # The client connects from 127.0.0.2, the address every RFC 5782 list must list (as SBL here).
    dns_server.add(BLOCKLIST)
    server = server_factory({"inbound.trusted_networks": [], "dnsbl.zones": ZONES})
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30, source_address=("127.0.0.2", 0)) as c:
        c.ehlo("mx.sender.test")
        c.mail("someone@sender.test")
        code, text = c.rcpt(BOB)
    assert code == 554 and text.startswith(b"5.7.1")
    assert b"127.0.0.2 is listed in zen.test" in text


def test_a_zone_that_lists_everything_is_ignored_not_obeyed(server_factory, dns_server: DnsServer) -> None:  # type: ignore[no-untyped-def]
    # 127.0.0.1 is the RFC 5782 negative test entry: a zone listing it lists everything.
    dns_server.add(BLOCKLIST + "1.0.0.127.zen.test. 300 IN A 127.0.0.4\n")
    server = server_factory({"inbound.trusted_networks": [], "dnsbl.zones": ZONES})
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("mx.sender.test")
        c.mail("someone@sender.test")
        assert c.rcpt(BOB)[0] == 250
    # ... and the administrator sees it on /metrics.
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'mailwarden_check_alerts_total{check="dnsbl",zone="zen.test"} 1.0' in text


def test_listed_sender_domain_is_refused_and_unlisted_passes(server_factory, dns_server: DnsServer) -> None:  # type: ignore[no-untyped-def]
    dns_server.add(BLOCKLIST)
    server = server_factory({"inbound.trusted_networks": [], "dnsbl.zones": ZONES})
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("mx.sender.test")
        c.mail("spammer@bad-domain.test")
        code, text = c.rcpt(BOB)
        assert code == 554 and b"bad-domain.test is listed in dbl.test" in text
        c.rset()
        c.mail("someone@good.test")
        assert c.rcpt(BOB)[0] == 250


@pytest.mark.parametrize(
    "mail_from",
    ['<"alerts@bank.test"@attacker.test>', "<alerts@bank.test(comment)>", "<@bank.test:x@attacker.test>"],
    ids=["quoted", "parentheses", "route"],
)
def test_mail_from_tricks_end_in_a_refusal(checked: RunningServer, mail_from: str) -> None:
    """The envelope sender cannot lend a forged From header a pass."""
    with smtplib.SMTP("127.0.0.1", checked.ports["mx"], timeout=30) as c:
        c.ehlo("mx.sender.test")
        code, _ = c.docmd("MAIL", f"FROM:{mail_from}")
        if code != 250:
            assert 500 <= code < 600  # refused at MAIL
            return
        assert c.rcpt(BOB)[0] == 250
        code, text = c.data(message("Bank <alerts@bank.test>"))
    assert (code, text[:5]) == (550, b"5.7.1")
    assert checked.inbox(BOB) == []


def test_disabled_checks_do_not_run(server_factory, dns_server: DnsServer) -> None:  # type: ignore[no-untyped-def]
    dns_server.add(ZONE)
    server = server_factory({"inbound.trusted_networks": [], "inbound.disabled_checks": ["dmarc", "spf"]})
    code, _ = send(server, "x@attacker.test", message("Bank <alerts@bank.test>"))
    assert code == 250  # without DMARC nothing refuses this forgery: the administrator chose so
    head = server.message(BOB, 1).decode().split("\r\n\r\n", 1)[0]
    assert "dmarc=" not in head and "spf=" not in head and "dkim=none" in head


def test_dmarc_report_data_is_kept_for_domains_that_ask(checked: RunningServer, dns_server: DnsServer) -> None:
    """rua= domains get a row per message, refused ones included; others get none."""
    dns_server.add('_dmarc.reports.test. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:agg@reports.test"\n')
    dns_server.add('reports.test. 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"\n')
    assert send(checked, "a@reports.test", message("a@reports.test"))[0] == 250  # SPF-aligned pass
    assert send(checked, "x@attacker.test", message("a@reports.test"))[0] == 550  # forgery, refused
    assert send(checked, "x@attacker.test", message("Shop <orders@shop.test>"))[0] == 250  # no rua: no row
    checked.wait_filed()
    rows = checked.call(checked.server.store.dmarc_records(0.0))
    assert sorted((r.header_from, r.disposition, r.spf_aligned, r.source_ip) for r in rows) == [
        ("reports.test", "none", "pass", "127.0.0.1"),
        ("reports.test", "reject", "fail", "127.0.0.1"),
    ]
    assert all(r.policy_domain == "reports.test" for r in rows)
