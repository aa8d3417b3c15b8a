"""The DSN builder (outbound/bounces.py): RFC 3464 structure, routing, and hostile originals.

The end-to-end cases (a 5xx, an expiry and a delay warning reaching the
sender's INBOX) are in tests/test_queue_runner.py; these check what every
DSN must be, whatever the original message and the remote's answer hold.
"""

from __future__ import annotations

import email
import email.policy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden.outbound.bounces import (
    MAX_LISTED_RECIPIENTS,
    ORIGINAL_HEADERS_MAX,
    DsnRecipient,
    DsnReport,
    build_dsn,
    original_headers,
    route_dsn,
)
from mailwarden.storage.interfaces import Resolution

NOW = 1_767_225_600.0  # 2026-01-01
ORIGINAL = (
    b"Received: from laptop ([127.0.0.1])\r\n\tby mail.example.test\r\n"
    b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: =?utf-8?q?caf=C3=A9?= plans\r\n"
    b"Message-ID: <m1@example.test>\r\n\r\nThe body, which the DSN does not quote.\r\n"
)


def report(action: str = "failed", **kw: object) -> DsnReport:
    rcpt = DsnRecipient(
        "bob@remote.test", "5.1.1", 550, "5.1.1 <bob@remote.test>: no such user", "mx.remote.test [192.0.2.1]", NOW
    )
    args: dict[str, object] = {
        "action": action,
        "queue_id": "QID1",
        "sender": "alice@example.test",
        "arrival": NOW - 100,
        "recipients": [rcpt],
        "will_retry_until": NOW + 3600 if action == "delayed" else None,
    }
    args.update(kw)
    return DsnReport(**args)  # type: ignore[arg-type]


def build(r: DsnReport, original: bytes = ORIGINAL) -> bytes:
    return build_dsn(r, original, reporting_mta="mail.example.test", postmaster_domain="example.test", now=NOW)


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def test_a_bounce_is_an_rfc3464_report() -> None:
    raw = build(report())
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = parse(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@example.test>"
    assert msg["To"] == "alice@example.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == msg["References"] == "<m1@example.test>"
    assert (msg.get_content_type(), msg.get_param("report-type")) == ("multipart/report", "delivery-status")
    text, status, headers = msg.iter_parts()
    words = " ".join(text.get_content().split())  # the text is wrapped at 76 columns
    assert "<bob@remote.test>: mx.remote.test said: 550 5.1.1 <bob@remote.test>: no such user" in words
    assert "Its subject was: café plans" in words
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_message["Arrival-Date"] == "Wed, 31 Dec 2025 23:58:20 +0000"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@remote.test"
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("failed", "5.1.1")
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: no such user"
    assert per_rcpt["Last-Attempt-Date"] == "Thu, 01 Jan 2026 00:00:00 +0000"
    assert per_rcpt["Will-Retry-Until"] is None
    quoted = headers.get_content()
    assert "Subject: =?utf-8?q?caf=C3=A9?= plans" in quoted and "The body" not in quoted


def test_a_delay_warning_says_until_when() -> None:
    msg = parse(
        build(report("delayed", recipients=[DsnRecipient("bob@remote.test", "4.4.1", None, "connection refused")]))
    )
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, status, _ = msg.iter_parts()
    _, r = status.get_payload()
    assert (r["Action"], r["Status"]) == ("delayed", "4.4.1")
    assert r["Will-Retry-Until"] == "Thu, 01 Jan 2026 01:00:00 +0000"
    assert r["Diagnostic-Code"] == "X-Mailwarden; connection refused"  # no SMTP reply to quote
    assert r["Remote-MTA"] is None


def test_a_failure_that_did_not_expire_is_permanent_in_the_status() -> None:
    r = DsnRecipient("bob@remote.test", "4.2.2", 452, "mailbox full")
    _, status, _ = parse(build(report(recipients=[r]))).iter_parts()
    assert status.get_payload()[1]["Status"] == "5.0.0"
    _, status, _ = parse(build(report(recipients=[r], expired=True))).iter_parts()
    assert status.get_payload()[1]["Status"] == "4.2.2"  # expired: the last temporary status, as Postfix does


def test_remote_text_cannot_inject_fields_or_parts() -> None:
    evil = "5.1.1 no\r\nAction: delivered\r\n\r\n--boundary\r\nContent-Type: text/html\r\n\r\n<script>"
    raw = build(report(recipients=[DsnRecipient("bob@remote.test", "5.1.1", 550, evil, "x\r\nRemote-MTA: y")]))
    msg = parse(raw)
    _, status, _ = msg.iter_parts()
    per_rcpt = status.get_payload()[1]
    assert per_rcpt.get_all("Action") == ["failed"]
    assert per_rcpt.get_all("Remote-MTA") == ["dns; x Remote-MTA: y"]
    assert len(list(msg.iter_parts())) == 3


def test_long_answers_are_folded_under_the_line_limit() -> None:
    words = " ".join(f"word{i}" for i in range(400))
    for text in (words, "x" * 3000, "é" * 3000):
        raw = build(report(recipients=[DsnRecipient("bob@remote.test", "5.7.1", 550, text, "mx.remote.test")]))
        assert max(len(line) for line in raw.split(b"\r\n")) <= 998
        _, status, _ = parse(raw).iter_parts()
        if text is words:  # folded at spaces: unfolding gives the (bounded) answer back
            assert status.get_payload()[1]["Diagnostic-Code"] == f"smtp; 550 {words[:1000]}"


def test_many_recipients_are_listed_up_to_a_bound() -> None:
    many = [DsnRecipient(f"u{i}@remote.test", "5.1.1", 550, "no") for i in range(MAX_LISTED_RECIPIENTS + 50)]
    msg = parse(build(report(recipients=many)))
    text, status, _ = msg.iter_parts()
    assert len(status.get_payload()) == 1 + MAX_LISTED_RECIPIENTS
    assert "... and 50 more recipients" in " ".join(text.get_content().split())


def test_dsn_routing_local_remote_and_nowhere() -> None:
    local = route_dsn(Resolution("hosted", local=("alice@example.test",)), "D1", "alice@example.test", b"dsn")
    assert local is not None and not local.remote
    [(item, data)] = local.local
    assert (item.queue_id, item.account_address, item.mailbox) == ("D1", "alice@example.test", "INBOX")
    assert data == b"Return-Path: <>\r\ndsn"
    remote = route_dsn(Resolution("relay", remote=("w@origin.test",)), "D2", "w@origin.test", b"dsn")
    assert remote is not None and not remote.local
    [(ritem, _)] = remote.remote
    assert (ritem.sender, ritem.recipient) == ("", "w@origin.test")  # a DSN's envelope sender is <>
    assert route_dsn(Resolution("unknown"), "D3", "gone@example.test", b"dsn") is None


def test_original_headers_are_bounded_and_clean() -> None:
    huge = b"".join(b"X-Long-%d: %s\r\n" % (i, b"a" * 5000) for i in range(100)) + b"\r\nbody"
    quoted = original_headers(huge)
    assert len(quoted) <= ORIGINAL_HEADERS_MAX
    assert all(len(line) <= 998 for line in quoted.split(b"\r\n"))
    assert original_headers(b"A: 1\nB: 2\rC: 3\x00\r\n\r\nbody") == b"A: 1\r\nB: 2\r\nC: 3\r\n"
    assert original_headers(b"") == b""


header_line = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda name, value: name + b": " + value,
        st.sampled_from([b"Subject", b"Message-ID", b"From", b"subject", b"SUBJECT ", b"Subject\t"]),
        st.one_of(
            st.binary(max_size=400),
            st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
            st.sampled_from([b"=?", b"=?utf-8?", b"=?utf-8?q?", b"=?x?b?====?=", b"=?utf-8?b?\xff?=", b"<", b"<a@b>"]),
        ),
    ),
    st.sampled_from([b" folded", b"\tfolded", b"\r", b"\n", b"\r\n", b"\x00"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(header_line, max_size=60),
    tail=st.binary(max_size=200),
    text=st.one_of(st.text(max_size=3000), st.text(alphabet="ab é\r\n", min_size=900, max_size=3000)),
    recipient=st.text(max_size=400),
    remote=st.text(max_size=300),
    code=st.one_of(st.none(), st.integers(min_value=-10, max_value=1000)),
    status=st.text(max_size=20),
    action=st.sampled_from(["failed", "delayed"]),
)
def test_dsn_builder_never_raises_and_stays_bounded(
    lines: list[bytes],
    tail: bytes,
    text: str,
    recipient: str,
    remote: str,
    code: int | None,
    status: str,
    action: str,
) -> None:
    original = b"\r\n".join(lines) + tail
    r = DsnRecipient(recipient, status, code, text, remote, NOW)
    raw = build(report(action, sender=recipient, recipients=[r, r]), original)
    assert len(raw) <= ORIGINAL_HEADERS_MAX + 16_000  # the quoted headers plus a bounded report
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert [b["Action"] for b in blocks[1:]] == [action, action]
