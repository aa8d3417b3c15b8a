"""MxTransport against a real Postfix (tests/remote_mx.py) and the dnslib DNS server.

Covers MX routing (preference, null MX, SERVFAIL, implicit MX), opportunistic STARTTLS,
byte-exact CRLF/dot-stuffed data, the bare-LF refusal, per-recipient 4xx/5xx outcomes,
connection reuse and the per-host connection bound.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

from tests.conftest import DnsServer
from tests.remote_mx import (
    MX_ZONE,
    RemoteMx,
    free_port,
    make_transport,
    message,
    remote_mx,
    wait_until,
    without_trace,
)

__all__ = ["remote_mx"]  # the fixture, imported for pytest


def unique(domain: str = "dest.test") -> str:
    return f"u{uuid.uuid4().hex[:10]}@{domain}"


async def test_delivers_over_starttls_byte_exact(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    dns_server.add(MX_ZONE + "dest.test. 300 IN MX 10 a.mx.test.\n")
    rcpt = unique()
    body = b"Line one.\r\n.A line that starts with a dot\r\n.\r\n..two dots\r\nLast line \xc3\xa9.\r\n"
    msg = message("byte exact", rcpt, body)
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    mark = remote_mx.mark()
    try:
        [outcome] = await transport.send("sender@origin.test", [rcpt], msg, "dest.test")
    finally:
        await transport.close()
    assert outcome.status == "delivered", outcome
    assert (outcome.code, outcome.enhanced) == (250, "2.0.0")
    assert outcome.remote == "a.mx.test[127.0.0.2]"
    assert outcome.tls.startswith("TLSv1.")
    [stored] = remote_mx.wait_messages(rcpt)
    assert without_trace(stored) == msg
    assert b"with ESMTPS" in stored  # Postfix's Received header: the session was TLS
    remote_mx.wait_log(mark, "Anonymous TLS connection established from")
    lines = [r.getMessage() for r in caplog.records if "event=delivery" in r.getMessage()]
    assert len(lines) == 1
    assert f"recipient={rcpt}" in lines[0] and "status=delivered" in lines[0] and "code=250" in lines[0]
    assert "domain=dest.test" in lines[0] and "mx=a.mx.test[127.0.0.2]" in lines[0] and "tls=TLSv1." in lines[0]


@pytest.mark.parametrize("bad", [b"\n", b"\r", b"\r\r\n"], ids=["bare-lf", "bare-cr", "cr-crlf"])
async def test_bare_line_ending_is_refused_locally(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx, bad: bytes
) -> None:
    dns_server.add(MX_ZONE + "dest.test. 300 IN MX 10 a.mx.test.\n")
    rcpt = unique()
    msg = message("smuggle", rcpt, b"first\r\n.\r" + bad + b"MAIL FROM:<evil@x.test>" + bad + b"end\r\n")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    mark = remote_mx.mark()
    try:
        [outcome] = await transport.send("sender@origin.test", [rcpt], msg, "dest.test")
    finally:
        await transport.close()
    assert (outcome.status, outcome.code, outcome.enhanced) == ("failed", None, "5.6.0")
    assert "bare CR or LF" in outcome.text
    assert transport.connections_opened == 0  # never even connected
    assert dns_server.queries == []  # not even looked up
    assert remote_mx.messages(rcpt) == []
    assert "connect from" not in remote_mx.log_since(mark)


async def test_rcpt_replies_give_per_recipient_outcomes(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    dns_server.add(MX_ZONE + "dest.test. 300 IN MX 10 a.mx.test.\n")
    ok = unique()
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    try:
        outcomes = await transport.send(
            "sender@origin.test", [ok, "tempfail@dest.test", "reject@dest.test"], message("mixed", ok), "dest.test"
        )
    finally:
        await transport.close()
    got = [(o.recipient, o.status, o.code, o.enhanced) for o in outcomes]
    assert got == [
        (ok, "delivered", 250, "2.0.0"),
        ("tempfail@dest.test", "deferred", 450, "4.2.1"),
        ("reject@dest.test", "failed", 550, "5.1.1"),
    ]
    assert "Mailbox busy" in outcomes[1].text and "No such user" in outcomes[2].text
    remote_mx.wait_messages(ok)


async def test_all_recipients_refused_sends_no_data(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add(MX_ZONE + "dest.test. 300 IN MX 10 a.mx.test.\n")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    mark = remote_mx.mark()
    try:
        outcomes = await transport.send("s@origin.test", ["reject@dest.test"], message("none", "x"), "dest.test")
    finally:
        await transport.close()
    assert [(o.status, o.code) for o in outcomes] == [("failed", 550)]
    line = remote_mx.wait_log(mark, "disconnect from")
    assert "data=" not in line.split("disconnect from", 1)[1].splitlines()[0]


async def test_null_mx_fails_at_once_without_connecting(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    dns_server.add("nomail.test. 300 IN MX 0 .\nnomail.test. 300 IN A 127.0.0.2\n")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    try:
        outcomes = await transport.send(
            "s@origin.test", ["a@nomail.test", "b@nomail.test"], message("n", "x"), "nomail.test"
        )
    finally:
        await transport.close()
    assert [(o.status, o.code, o.enhanced) for o in outcomes] == [("failed", None, "5.1.10")] * 2
    assert "null MX" in outcomes[0].text
    assert transport.connections_opened == 0
    assert ("nomail.test", "A") not in dns_server.queries  # no fallback to the address


async def test_mx_servfail_defers(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.servfail.add("broken.test")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    try:
        [outcome] = await transport.send("s@origin.test", ["a@broken.test"], message("s", "x"), "broken.test")
    finally:
        await transport.close()
    assert (outcome.status, outcome.code, outcome.enhanced) == ("deferred", None, "4.4.3")
    assert "SERVFAIL" in outcome.text
    assert transport.connections_opened == 0


async def test_nxdomain_fails(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add("other.test. 300 IN A 127.0.0.2\n")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    try:
        [outcome] = await transport.send("s@origin.test", ["a@gone.test"], message("s", "x"), "gone.test")
    finally:
        await transport.close()
    assert (outcome.status, outcome.enhanced) == ("failed", "5.1.2")


async def test_preference_order_and_fallback_to_next_mx(
    tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx
) -> None:
    # 127.0.0.9 listens on nothing: the best MX is down, the next one takes the mail.
    dns_server.add(
        MX_ZONE
        + "dest.test. 300 IN MX 30 a.mx.test.\ndest.test. 300 IN MX 20 b.mx.test.\n"
        + "dest.test. 300 IN MX 10 down.mx.test.\ndown.mx.test. 300 IN A 127.0.0.9\n"
    )
    rcpt = unique()
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    try:
        [outcome] = await transport.send("s@origin.test", [rcpt], message("pref", rcpt), "dest.test")
    finally:
        await transport.close()
    assert outcome.status == "delivered"
    assert outcome.remote == "b.mx.test[127.0.0.2]"  # preference 20 before 30
    assert transport.connections_opened == 2
    remote_mx.wait_messages(rcpt)


async def test_equal_preferences_are_shuffled(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add(MX_ZONE + "dest.test. 300 IN MX 10 a.mx.test.\ndest.test. 300 IN MX 10 b.mx.test.\n")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    seen = set()
    try:
        for _ in range(24):
            rcpt = unique()  # accepted ones: Postfix slows down sessions that collect rejections
            [outcome] = await transport.send("s@origin.test", [rcpt], message("r", rcpt), "dest.test")
            seen.add(outcome.remote)
    finally:
        await transport.close()
    assert seen == {"a.mx.test[127.0.0.2]", "b.mx.test[127.0.0.2]"}


async def test_no_mx_falls_back_to_address(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add("implicit.test. 300 IN A 127.0.0.2\n")
    rcpt = unique("implicit.test")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    try:
        [outcome] = await transport.send("s@origin.test", [rcpt], message("implicit", rcpt), "implicit.test")
    finally:
        await transport.close()
    assert outcome.status == "delivered"
    assert outcome.remote == "implicit.test[127.0.0.2]"
    remote_mx.wait_messages(rcpt)


async def test_unreachable_mx_defers(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add("dest.test. 300 IN MX 10 down.mx.test.\ndown.mx.test. 300 IN A 127.0.0.9\n")
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    try:
        [outcome] = await transport.send("s@origin.test", [unique()], message("d", "x"), "dest.test")
    finally:
        await transport.close()
    assert (outcome.status, outcome.code, outcome.enhanced) == ("deferred", None, "4.4.1")
    assert "down.mx.test[127.0.0.9]" in outcome.text


async def test_two_messages_share_one_connection(tmp_path: Path, dns_server: DnsServer, remote_mx: RemoteMx) -> None:
    dns_server.add(MX_ZONE + "dest.test. 300 IN MX 10 a.mx.test.\n")
    first, second = unique(), unique()
    transport = make_transport(tmp_path, dns_server.address, remote_mx.port, remote_mx.ca)
    mark = remote_mx.mark()
    try:
        [o1] = await transport.send("s@origin.test", [first], message("one", first), "dest.test")
        [o2] = await transport.send("s@origin.test", [second], message("two", second), "dest.test")
    finally:
        await transport.close()
    assert (o1.status, o2.status) == ("delivered", "delivered")
    assert transport.connections_opened == 1
    text = remote_mx.wait_log(mark, "disconnect from")
    assert text.count("connect from unknown[127.0.0.1]") - text.count("disconnect from") == 1
    stats = text.split("disconnect from", 1)[1].splitlines()[0]
    assert "mail=2" in stats and "data=2" in stats and "rset=1" in stats and "quit=1" in stats, stats
    remote_mx.wait_messages(first)
    remote_mx.wait_messages(second)


class _Counting:
    """An aiosmtpd server that counts open TCP connections and holds each DATA until `limit` are open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.peak = 0
        self.total = 0
        self.messages: list[bytes] = []
        self.full: asyncio.Event | None = None

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        assert self.full is not None
        try:
            await asyncio.wait_for(self.full.wait(), 5)  # make the connections overlap, bounded
        except TimeoutError:
            pass
        self.messages.append(envelope.content)  # type: ignore[attr-defined]
        return "250 2.0.0 Ok"


async def test_connections_per_host_are_bounded(tmp_path: Path, dns_server: DnsServer) -> None:
    counting = _Counting(limit=2)

    class CountingSMTP(AiosmtpdSMTP):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if counting.full is None:
                counting.full = asyncio.Event()
            counting.open += 1
            counting.total += 1
            counting.peak = max(counting.peak, counting.open)
            if counting.open >= counting.limit:
                counting.full.set()
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            counting.open -= 1
            super().connection_lost(exc)

    class CountingController(Controller):
        def factory(self) -> AiosmtpdSMTP:
            return CountingSMTP(self.handler, **self.SMTP_kwargs)

    port = free_port(("127.0.0.6",))
    controller = CountingController(counting, hostname="127.0.0.6", port=port)
    controller.start()
    wait_until(lambda: counting.open == 0, what="the controller's own start-up probe to close")
    counting.total = counting.peak = 0
    try:
        dns_server.add("bound.test. 300 IN MX 10 sink.mx.test.\nsink.mx.test. 300 IN A 127.0.0.6\n")
        from trustme import CA

        transport = make_transport(tmp_path, dns_server.address, port, CA(), **{"delivery.max_connections_per_host": 2})
        try:
            outcomes = await asyncio.gather(
                *(
                    transport.send("s@origin.test", [f"r{i}@bound.test"], message(f"m{i}", "x"), "bound.test")
                    for i in range(6)
                )
            )
        finally:
            await transport.close()
        assert [o.status for [o] in outcomes] == ["delivered"] * 6
        assert len(counting.messages) == 6
        assert counting.peak == 2  # the bound held, and was reached
        assert counting.total == 2  # the six messages rode on two connections
        assert transport.pools["sink.mx.test"].peak == 2
        wait_until(lambda: counting.open == 0, what="connections closed after close()")
    finally:
        controller.stop()
