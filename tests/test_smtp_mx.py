"""The MX listener: local delivery, recipient checks, relay refusal, trace headers."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import ALICE, BOB, RunningServer

MSG = b"From: sender@remote.test\r\nTo: bob@example.test\r\nSubject: hello bob\r\n\r\nHi Bob.\r\n"


def mx(server: RunningServer, tls: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30)
    client.ehlo("client.remote.test")
    if tls:
        client.starttls(context=server.tls.client_context())
        client.ehlo("client.remote.test")
    return client


def test_mail_to_local_user_lands_in_inbox_with_trace_headers(server: RunningServer) -> None:
    with mx(server) as c:
        refused = c.sendmail("sender@remote.test", [BOB], MSG)
    assert refused == {}
    rows = server.inbox(BOB)
    assert [(r[0], r[2], r[3]) for r in rows] == [("1", "sender@remote.test", "hello bob")]
    raw = server.message(BOB, 1)
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Return-Path: <sender@remote.test>\r\nReceived: from client.remote.test ([127.0.0.1])")
    assert "(using TLSv1.3 with cipher" in head
    assert "with ESMTPS id" in head  # S: TLS, no A: not authenticated
    assert raw.endswith(b"\r\n\r\nHi Bob.\r\n")


def test_unknown_recipient_is_refused_at_rcpt_with_5_1_1(server: RunningServer) -> None:
    with mx(server) as c:
        c.mail("sender@remote.test")
        code, text = c.rcpt("nobody@example.test")
    assert (code, text[:5]) == (550, b"5.1.1")


def test_relay_to_foreign_domain_is_refused_without_auth(server: RunningServer) -> None:
    with mx(server) as c:
        c.mail("sender@remote.test")
        code, text = c.rcpt("victim@elsewhere.test")
    assert (code, text[:5]) == (554, b"5.7.1")
    assert server.cli("queue", "list")[1].count("\n") == 1  # header only: nothing queued


def test_no_auth_offered_before_tls_and_auth_refused(server: RunningServer) -> None:
    with mx(server, tls=False) as c:
        assert not c.has_extn("auth")
        assert c.has_extn("starttls")
        code, text = c.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNlIGJhdHRlcnkgc3RhcGxl")
    assert code == 538 and text.startswith(b"5.7.11")


def test_ehlo_advertises_the_extensions_we_honour(server: RunningServer) -> None:
    with mx(server, tls=False) as c:
        for ext in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "size", "starttls"):
            assert c.has_extn(ext), ext
        assert int(c.esmtp_features["size"]) == 26_214_400


def test_alias_plus_tag_and_catch_all(server: RunningServer) -> None:
    assert server.cli("alias", "add", "info@example.test", BOB)[0] == 0
    with mx(server) as c:
        assert c.sendmail("s@remote.test", ["info@example.test", "alice+lists@example.test"], MSG) == {}
        c.mail("s@remote.test")
        code, _ = c.rcpt("random@example.test")
        assert code == 550  # catch-all is off until an admin adds one
        c.rset()
    assert server.cli("alias", "add", "@example.test", ALICE)[0] == 0
    with mx(server) as c:
        assert c.sendmail("s@remote.test", ["random@example.test"], MSG) == {}
    assert len(server.inbox(BOB)) == 1
    assert len(server.inbox(ALICE)) == 2


def test_recipient_limit_gives_452(server_factory) -> None:
    server = server_factory({"smtp.max_recipients": 2})
    with mx(server) as c:
        c.mail("s@remote.test")
        assert c.rcpt(ALICE)[0] == 250
        assert c.rcpt(BOB)[0] == 250
        code, text = c.rcpt(BOB)
    assert (code, text[:5]) == (452, b"4.5.3")


def test_size_declared_too_big_is_refused_at_mail(server_factory) -> None:
    server = server_factory({"smtp.max_message_size": 10_000})
    with mx(server) as c:
        code, text = c.mail("s@remote.test", ["SIZE=20000"])
    assert (code, text[:5]) == (552, b"5.3.4")


def test_oversized_message_gets_552_as_it_streams(server_factory) -> None:
    server = server_factory({"smtp.max_message_size": 10_000})
    body = MSG + (b"x" * 70 + b"\r\n") * 500
    with mx(server) as c:
        c.mail("s@remote.test")  # no SIZE= declared: the limit is enforced while streaming
        c.rcpt(BOB)
        code, text = c.data(body)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert c.noop()[0] == 250  # the session goes on
    assert server.inbox(BOB) == []


def test_messages_per_session_limit(server_factory) -> None:
    server = server_factory({"smtp.max_messages_per_session": 2})
    c = mx(server)
    c.sendmail("s@remote.test", [BOB], MSG)
    c.sendmail("s@remote.test", [BOB], MSG)
    code, text = c.mail("s@remote.test")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        c.noop()  # the server closed the session
    assert (code, text[:5]) == (421, b"4.7.0")
    assert len(server.inbox(BOB)) == 2


def test_null_sender_is_accepted_for_bounces(server: RunningServer) -> None:
    with mx(server) as c:
        assert c.sendmail("<>", [BOB], MSG) == {}
    assert server.message(BOB, 1).startswith(b"Return-Path: <>\r\n")
