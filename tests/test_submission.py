"""Submission on 587 (STARTTLS) and 465 (implicit TLS): AUTH and send-as rules."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import ALICE, ALICE_PW, BOB, RunningServer


def msg(from_header: str = ALICE, extra: str = "") -> bytes:
    return (
        f"From: {from_header}\r\nTo: {BOB}\r\nSubject: from alice\r\n{extra}\r\nHello Bob, it is Alice.\r\n"
    ).encode()


def submission(server: RunningServer, login: bool = True) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
    c.ehlo("laptop")
    c.starttls(context=server.tls.client_context())
    c.ehlo("laptop")
    if login:
        c.login(ALICE, ALICE_PW)
    return c


def submissions(server: RunningServer) -> smtplib.SMTP_SSL:
    c = smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], timeout=30, context=server.tls.client_context())
    c.ehlo("laptop")
    return c


def test_587_starttls_auth_plain_delivers_with_message_id_added(server: RunningServer) -> None:
    with submission(server) as c:
        assert c.sendmail(ALICE, [BOB], msg()) == {}
    rows = server.inbox(BOB)
    assert [(r[2], r[3]) for r in rows] == [(ALICE, "from alice")]
    raw = server.message(BOB, 1).decode()
    assert "with ESMTPSA id" in raw  # the authenticated flag (RFC 3848)
    assert "\r\nMessage-ID: <" in raw


def test_existing_message_id_is_kept(server: RunningServer) -> None:
    with submission(server) as c:
        c.sendmail(ALICE, [BOB], msg(extra="Message-ID: <keep-me@example.test>\r\n"))
    raw = server.message(BOB, 1).decode()
    assert raw.count("Message-ID") == 1 and "<keep-me@example.test>" in raw


def test_465_implicit_tls_auth_login(server: RunningServer) -> None:
    with submissions(server) as c:
        assert c.has_extn("auth") and not c.has_extn("starttls")
        c.user, c.password = ALICE, ALICE_PW
        code, _ = c.auth("LOGIN", c.auth_login)
        assert code == 235
        assert c.sendmail(ALICE, [BOB], msg()) == {}
    assert len(server.inbox(BOB)) == 1


def test_wrong_password_gets_535_not_a_hang(server: RunningServer) -> None:
    with submission(server, login=False) as c, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        c.login(ALICE, "wrong password entirely")
    assert (err.value.smtp_code, err.value.smtp_error[:5]) == (535, b"5.7.8")


def test_unknown_user_gets_the_same_535(server: RunningServer) -> None:
    with submission(server, login=False) as c, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        c.login("nobody@example.test", ALICE_PW)
    assert err.value.smtp_code == 535


def test_mail_before_auth_is_refused(server: RunningServer) -> None:
    with submission(server, login=False) as c:
        code, text = c.mail(ALICE)
    assert (code, text[:5]) == (530, b"5.7.0")


def test_auth_before_starttls_on_587_is_refused(server: RunningServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.ehlo("laptop")
        assert not c.has_extn("auth")
        code, _ = c.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNlIGJhdHRlcnkgc3RhcGxl")
    assert code == 538


def test_cannot_send_as_another_user_in_envelope(server: RunningServer) -> None:
    with submission(server) as c:
        code, text = c.mail(BOB)
    assert code == 553 and text.startswith(b"5.7.1")


@pytest.mark.parametrize(
    "header",
    [
        "From: bob@example.test",
        "From: alice@example.test, bob@example.test",
        "From: alice@example.test\r\nFrom: alice@example.test",
        "X-No-From: here",
        'From: "alice@example.test"@evil.test',
    ],
    ids=["other-user", "two-addresses", "two-from-headers", "no-from", "quoted-spoof"],
)
def test_header_from_must_be_one_owned_address(server: RunningServer, header: str) -> None:
    body = f"{header}\r\nTo: {BOB}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    with submission(server) as c, pytest.raises(smtplib.SMTPDataError) as err:
        c.sendmail(ALICE, [BOB], body)
    assert (err.value.smtp_code, err.value.smtp_error[:5]) == (550, b"5.7.1")
    assert server.inbox(BOB) == []


def test_alias_owner_may_send_as_alias(server: RunningServer) -> None:
    assert server.cli("alias", "add", "sales@example.test", ALICE)[0] == 0
    with submission(server) as c:
        assert c.sendmail("sales@example.test", [BOB], msg("Sales <sales@example.test>")) == {}
    assert len(server.inbox(BOB)) == 1


def test_authenticated_relay_is_queued_for_remote_delivery(server: RunningServer) -> None:
    with submission(server) as c:
        assert c.sendmail(ALICE, ["friend@remote.test", BOB], msg()) == {}
    server.wait_filed()
    code, out, _ = server.cli("queue", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    qid, _created, status, _attempts, sender, rcpt = lines[1].split("\t")
    assert (status, sender, rcpt) == ("queued", ALICE, "friend@remote.test")
    code, shown, _ = server.cli("queue", "show", qid)
    assert code == 0 and "Recipient: <friend@remote.test>" in shown and "Hello Bob, it is Alice." in shown
    assert server.cli("queue", "delete", qid)[0] == 0
    assert server.cli("queue", "list")[1].count("\n") == 1
    assert len(server.inbox(BOB)) == 1  # the local copy was delivered
