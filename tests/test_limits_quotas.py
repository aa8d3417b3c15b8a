"""Outbound limits (global, per domain, per user) and sending quotas, over real SMTP submission."""

from __future__ import annotations

import base64
import smtplib

import pytest

from tests.conftest import ALICE, ALICE_PW, BOB, BOB_PW, RunningServer


def submission(server: RunningServer, user: str = ALICE, password: str = ALICE_PW) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
    c.ehlo("laptop")
    c.starttls(context=server.tls.client_context())
    c.ehlo("laptop")
    c.login(user, password)
    return c


def note(sender: str = ALICE, rcpt: str = BOB, subject: str = "hi", extra: str = "", body: str = "hello\r\n") -> bytes:
    return f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n{extra}\r\n{body}".encode()


def with_attachment(size: int, name: str = "report.pdf") -> bytes:
    payload = base64.encodebytes(b"%PDF" + b"\x00" * size).decode().replace("\n", "\r\n")
    return (
        f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        f'--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="{name}"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{payload}--b1--\r\n"
    ).encode()


def rcpt_codes(c: smtplib.SMTP, rcpts: list[str]) -> list[tuple[int, bytes]]:
    return [c.rcpt(r) for r in rcpts]


def test_user_override_wins_over_domain_and_global_recipient_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(
        {
            "smtp.max_recipients": 5,
            "limits.overrides": {"example.test": {"max_recipients": 3}, ALICE: {"max_recipients": 2}},
        }
    )
    rcpts = [f"someone{i}@elsewhere.test" for i in range(4)]
    with submission(server) as c:
        c.mail(ALICE)
        codes = rcpt_codes(c, rcpts)
    assert [code for code, _ in codes] == [250, 250, 452, 452]
    assert codes[2][1].startswith(b"4.5.3")
    with submission(server, BOB, BOB_PW) as c:  # the domain's value, not alice's
        c.mail(BOB)
        assert [code for code, _ in rcpt_codes(c, rcpts)] == [250, 250, 250, 452]


def test_declared_size_over_the_user_limit_is_refused_at_mail(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"limits.overrides": {ALICE: {"max_message_bytes": 2048}}})
    with submission(server) as c:
        code, text = c.mail(ALICE, ["SIZE=5000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        assert c.mail(ALICE, ["SIZE=1000"])[0] == 250
        assert c.rcpt(BOB)[0] == 250
        code, text = c.data(note(body="x" * 3000 + "\r\n"))  # no SIZE= declared: cut off while streaming
        assert (code, text[:5]) == (552, b"5.3.4")
    assert server.inbox(BOB) == []


def test_large_header_section_is_refused_after_data(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"limits.max_header_bytes": 2048})
    big = "".join(f"X-Filler-{i}: {'y' * 60}\r\n" for i in range(60))
    with submission(server) as c, pytest.raises(smtplib.SMTPDataError) as refused:
        c.sendmail(ALICE, [BOB], note(extra=big))
    assert refused.value.smtp_code == 552 and b"header" in refused.value.smtp_error
    with submission(server) as c:
        assert c.sendmail(ALICE, [BOB], note()) == {}  # a normal header is fine
    assert len(server.inbox(BOB)) == 1


def test_attachment_limits_per_part_and_total(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"limits.max_attachment_bytes": 10_000, "limits.max_attachments_total_bytes": 15_000})
    with submission(server) as c:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail(ALICE, [BOB], with_attachment(20_000, "big.pdf"))
        assert refused.value.smtp_code == 552 and b'"big.pdf"' in refused.value.smtp_error
        assert c.sendmail(ALICE, [BOB], with_attachment(5_000)) == {}
    assert [r[3] for r in server.inbox(BOB)] == ["report"]


def test_messages_per_session_per_domain(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"limits.overrides": {"example.test": {"max_messages_per_session": 1}}})
    with submission(server) as c:
        assert c.sendmail(ALICE, [BOB], note()) == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            c.sendmail(ALICE, [BOB], note())
        assert refused.value.smtp_code == 421


def test_hourly_message_quota_refuses_with_451_and_alerts_postmaster_once(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"quotas.user_messages_per_hour": 2})
    code, _, err = server.cli("alias", "add", "postmaster@example.test", BOB)
    assert code == 0, err
    with submission(server) as c:
        for _ in range(2):
            assert c.sendmail(ALICE, [BOB], note(subject="ok")) == {}
        for _ in range(3):
            code, text = c.mail(ALICE)
            assert (code, text[:5]) == (451, b"4.7.1")
            assert b"quota" in text.lower()
            c.rset()
    rows = server.inbox(BOB)
    alerts = [r for r in rows if r[3].startswith("Sending quota reached")]
    assert len(alerts) == 1 and ALICE in alerts[0][3]
    assert [r[3] for r in rows].count("ok") == 2
    with submission(server, BOB, BOB_PW) as c:  # another user of the domain is not affected
        assert c.sendmail(BOB, [ALICE], note(sender=BOB, rcpt=ALICE)) == {}


def test_recipient_quota_is_checked_at_rcpt_and_exemptions_apply(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"quotas.user_recipients_per_hour": 3, "quotas.exempt": [BOB]})
    rcpts = [f"r{i}@elsewhere.test" for i in range(4)]
    with submission(server) as c:
        c.mail(ALICE)
        codes = rcpt_codes(c, rcpts)
    assert [code for code, _ in codes] == [250, 250, 250, 451]
    with submission(server, BOB, BOB_PW) as c:  # exempt: a newsletter account
        c.mail(BOB)
        assert [code for code, _ in rcpt_codes(c, rcpts)] == [250, 250, 250, 250]


def test_mx_applies_the_global_header_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"limits.max_header_bytes": 1024})
    big = "".join(f"X-Filler-{i}: {'y' * 60}\r\n" for i in range(30))
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("mx.elsewhere.test")
        c.starttls(context=server.tls.client_context())
        c.ehlo("mx.elsewhere.test")
        c.mail("someone@elsewhere.test")
        c.rcpt(BOB)
        code, text = c.data(note(sender="someone@elsewhere.test", extra=big))
    assert (code, text[:5]) == (552, b"5.3.4")
