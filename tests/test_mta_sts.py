"""MTA-STS (RFC 8461): the strict policy parser, the bounded HTTPS fetch, and enforcement against real Postfix.

The policy server is real HTTPS (asyncio + ssl, a trustme certificate for mta-sts.<domain>); the
remote MX hosts are the private Postfix of tests/remote_mx.py.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from pathlib import Path

import pytest

from mailwarden.dns.resolver import Resolver
from mailwarden.outbound.mta_sts import MtaStsError, StsPolicy, fetch_policy, parse_policy, parse_txt
from tests.conftest import DnsServer
from tests.remote_mx import MX_ZONE, PolicyServer, RemoteMx, Reply, make_transport, message, policy_text, remote_mx

__all__ = ["remote_mx"]  # the fixture, imported for pytest


# ---- parsing ---------------------------------------------------------------------------


def test_txt_record() -> None:
    assert parse_txt(["v=STSv1; id=20240101T000000;"]) == "20240101T000000"
    assert parse_txt(["v=STSv1;id=abc", "some other text"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: no policy (§3.1)
    assert parse_txt(["v=STSv1; id=has-dash"]) is None
    assert parse_txt(["v=STSv1"]) is None
    assert parse_txt([]) is None


def test_policy_parse_accepts_valid_policies() -> None:
    p = parse_policy(b"version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 604800\n", "x")
    assert p == StsPolicy("enforce", ("mail.example.com", "*.example.net"), 604800, "x")
    crlf = parse_policy(
        b"version: STSv1\r\nmode: testing\r\nmx: MX.Example.COM.\r\nmax_age: 9999999999\r\nfoo: bar\r\n"
    )
    assert crlf.mode == "testing" and crlf.mx == ("mx.example.com",) and crlf.max_age == 31_557_600
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 0").mx == ()


@pytest.mark.parametrize(
    "body",
    [
        b"mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
        b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
        b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",
        b"version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age 1\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n\xff\n",
        b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n" + b"x: y\n" * 20000,
    ],
)
def test_policy_parse_is_strict(body: bytes) -> None:
    with pytest.raises(MtaStsError):
        parse_policy(body)


def test_mx_patterns() -> None:
    p = StsPolicy("enforce", ("mail.example.com", "*.example.net"), 1, "x")
    assert p.matches("mail.example.com") and p.matches("MAIL.example.com.")
    assert p.matches("mx1.example.net")
    assert not p.matches("example.net")  # the wildcard needs one label
    assert not p.matches("a.b.example.net")  # ...and only one
    assert not p.matches("evil-mail.example.com")


# ---- fetching --------------------------------------------------------------------------


def _client_context(remote_mx: RemoteMx) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    remote_mx.ca.configure_trust(ctx)
    return ctx


async def test_fetch_is_bounded_and_follows_no_redirect(dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    domains = ("ok.test", "chunked.test", "redirect.test", "big.test", "html.test", "nocert.test")
    async with PolicyServer(remote_mx.ca, domains[:-1]) as server:
        dns_server.add(server.zone() + "mta-sts.nocert.test. 300 IN A 127.0.0.5\n")
        good = policy_text("enforce", "a.mx.test")
        server.replies["mta-sts.ok.test"] = Reply(good)
        server.replies["mta-sts.chunked.test"] = Reply(good, chunked=True)
        server.replies["mta-sts.redirect.test"] = Reply(b"", "301 Moved", extra_headers="Location: https://x.test/\r\n")
        server.replies["mta-sts.big.test"] = Reply(b"x" * (64 * 1024 + 1))
        server.replies["mta-sts.html.test"] = Reply(good, content_type="text/html")
        resolver = Resolver([dns_server.address], timeout=1.0)
        ctx = _client_context(remote_mx)

        async def fetch(domain: str) -> bytes:
            return await fetch_policy(domain, resolver, ctx, port=server.port, timeout=5)

        assert await fetch("ok.test") == good
        assert await fetch("chunked.test") == good
        with pytest.raises(MtaStsError, match="301"):
            await fetch("redirect.test")
        with pytest.raises(MtaStsError, match="over 65536"):
            await fetch("big.test")
        with pytest.raises(MtaStsError, match="text/plain"):
            await fetch("html.test")
        with pytest.raises(MtaStsError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetch("nocert.test")  # the server's certificate does not name mta-sts.nocert.test
        with pytest.raises(MtaStsError, match="no address"):
            await fetch("missing.test")


# ---- enforcement -----------------------------------------------------------------------


def _zone(domain: str, mx: str, policy_id: str = "1") -> str:
    return MX_ZONE + f'{domain}. 300 IN MX 10 {mx}.\n_mta-sts.{domain}. 0 IN TXT "v=STSv1; id={policy_id}"\n'


async def _send(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx, server: PolicyServer, domain: str, **kw: object
):
    rcpt = f"u{uuid.uuid4().hex[:10]}@{domain}"
    transport = make_transport(
        tmp_path, dns_server.address, remote_mx.port, remote_mx.ca, **{"delivery.mta_sts_port": server.port}
    )
    try:
        [outcome] = await transport.send("s@origin.test", [rcpt], message("sts", rcpt), domain)
    finally:
        await transport.close()
    return rcpt, outcome, transport


async def test_enforce_matching_mx_delivers_and_policy_is_cached(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    async with PolicyServer(remote_mx.ca, ("sts.test",)) as server:
        dns_server.add(server.zone() + _zone("sts.test", "a.mx.test", "one"))
        server.replies["mta-sts.sts.test"] = Reply(policy_text("enforce", "*.mx.test"))
        transport = make_transport(
            tmp_path, dns_server.address, remote_mx.port, remote_mx.ca, **{"delivery.mta_sts_port": server.port}
        )
        rcpts = [f"u{uuid.uuid4().hex[:10]}@sts.test" for _ in range(3)]
        try:
            [o1] = await transport.send("s@origin.test", [rcpts[0]], message("sts1", rcpts[0]), "sts.test")
            [o2] = await transport.send("s@origin.test", [rcpts[1]], message("sts2", rcpts[1]), "sts.test")
            assert len(server.requests) == 1  # the second message used the cached policy
            dns_server.records[:] = [r for r in dns_server.records if "_mta-sts" not in str(r.rname)]
            dns_server.add('_mta-sts.sts.test. 0 IN TXT "v=STSv1; id=two"\n')
            [o3] = await transport.send("s@origin.test", [rcpts[2]], message("sts3", rcpts[2]), "sts.test")
            assert len(server.requests) == 2  # a new id: fetched again
        finally:
            await transport.close()
    for outcome in (o1, o2, o3):
        assert outcome.status == "delivered", outcome
        assert outcome.tls.endswith(" mta-sts")
    assert server.requests[0].startswith("mta-sts.sts.test GET /.well-known/mta-sts.txt HTTP/1.1")
    for rcpt in rcpts:
        remote_mx.wait_messages(rcpt)


async def test_enforce_non_matching_mx_defers(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    async with PolicyServer(remote_mx.ca, ("sts.test",)) as server:
        dns_server.add(server.zone() + _zone("sts.test", "b.mx.test"))
        server.replies["mta-sts.sts.test"] = Reply(policy_text("enforce", "a.mx.test"))
        rcpt, outcome, transport = await _send(tmp_path, dns_server, remote_mx, server, "sts.test")
    assert (outcome.status, outcome.code, outcome.enhanced) == ("deferred", None, "4.7.5")
    assert "not listed in the MTA-STS policy" in outcome.text
    assert transport.connections_opened == 0
    assert remote_mx.messages(rcpt) == []
    assert any("event=tls_policy" in r.getMessage() and "mx=b.mx.test" in r.getMessage() for r in caplog.records)


async def test_enforce_certificate_that_does_not_verify_defers(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    async with PolicyServer(remote_mx.ca, ("sts.test",)) as server:
        dns_server.add(server.zone() + _zone("sts.test", "rogue.mx.test"))
        server.replies["mta-sts.sts.test"] = Reply(policy_text("enforce", "rogue.mx.test"))
        mark = remote_mx.mark()
        rcpt, outcome, _ = await _send(tmp_path, dns_server, remote_mx, server, "sts.test")
    assert (outcome.status, outcome.enhanced) == ("deferred", "4.7.5")
    assert "does not verify" in outcome.text
    line = remote_mx.wait_log(mark, "disconnect from")
    assert "mail=" not in line.split("disconnect from", 1)[1].splitlines()[0]  # no MAIL FROM was ever sent
    assert remote_mx.messages(rcpt) == []


async def test_enforce_with_starttls_stripped_defers_never_in_clear(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    async with PolicyServer(remote_mx.ca, ("sts.test",)) as server:
        dns_server.add(server.zone() + _zone("sts.test", "plain.mx.test"))
        server.replies["mta-sts.sts.test"] = Reply(policy_text("enforce", "plain.mx.test"))
        mark = remote_mx.mark()
        rcpt, outcome, transport = await _send(tmp_path, dns_server, remote_mx, server, "sts.test")
    assert (outcome.status, outcome.enhanced) == ("deferred", "4.7.5")
    assert "does not offer STARTTLS" in outcome.text and "not sent in clear" in outcome.text
    assert transport.connections_opened == 1
    stats = remote_mx.wait_log(mark, "disconnect from").split("disconnect from", 1)[1].splitlines()[0]
    assert "ehlo=1" in stats and "mail=" not in stats and "quit=1" in stats, stats
    assert remote_mx.messages(rcpt) == []


async def test_no_policy_delivers_in_clear_to_a_server_without_starttls(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    async with PolicyServer(remote_mx.ca, ("sts.test",)) as server:
        dns_server.add(MX_ZONE + "clear.test. 300 IN MX 10 plain.mx.test.\n")
        rcpt, outcome, _ = await _send(tmp_path, dns_server, remote_mx, server, "clear.test")
    assert (outcome.status, outcome.tls) == ("delivered", "")
    remote_mx.wait_messages(rcpt)


async def test_testing_mode_delivers_and_logs(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    async with PolicyServer(remote_mx.ca, ("sts.test",)) as server:
        dns_server.add(server.zone() + _zone("sts.test", "rogue.mx.test"))
        server.replies["mta-sts.sts.test"] = Reply(policy_text("testing", "rogue.mx.test"))
        rcpt, outcome, _ = await _send(tmp_path, dns_server, remote_mx, server, "sts.test")
    assert outcome.status == "delivered", outcome
    assert outcome.tls.startswith("TLSv1.") and "mta-sts" not in outcome.tls  # delivered without verification
    remote_mx.wait_messages(rcpt)
    lines = [r.getMessage() for r in caplog.records if "event=tls_policy" in r.getMessage()]
    assert any("testing" in line and "does not verify" in line for line in lines), lines


async def test_unreachable_policy_means_no_policy(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    # RFC 8461 §3.3: a TXT record but no fetchable policy and nothing cached: deliver as without MTA-STS.
    async with PolicyServer(remote_mx.ca, ("sts.test",)) as server:
        dns_server.add(server.zone() + _zone("sts.test", "rogue.mx.test"))
        rcpt, outcome, transport = await _send(tmp_path, dns_server, remote_mx, server, "sts.test")  # 404
    assert outcome.status == "delivered"
    assert transport.mta_sts.fetches == 1
    remote_mx.wait_messages(rcpt)
