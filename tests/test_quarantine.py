"""Attachment policy and quarantine end to end: smtplib to the MX, imaplib to read, the CLI to decide."""

from __future__ import annotations

import imaplib
import smtplib
import sqlite3
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailwarden.storage.interfaces import DeliveryBatch, QuarantineItem
from tests.conftest import ALICE, ALICE_PW, BOB, BOB_PW, DnsServer, RunningServer, run_cli

PE = b"MZ" + b"\0" * 58 + (64).to_bytes(4, "little") + b"PE\0\0" + b"\0" * 200
CHECKED = {
    "inbound.trusted_networks": [],  # loopback clients get the inbound checks
    "listen.imaps": "127.0.0.1:0",
}


def mail(subject: str, attachment: tuple[str, bytes] | None = ("invoice.pdf", PE)) -> bytes:
    m = EmailMessage()
    m["From"] = "Supplier <billing@supplier.test>"
    m["To"] = BOB
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@supplier.test>"
    m["Date"] = "Mon, 06 Jan 2025 10:00:00 +0000"
    m.set_content("Please find the invoice attached.\n")
    if attachment is not None:
        m.add_attachment(attachment[1], maintype="application", subtype="pdf", filename=attachment[0])
    m.add_attachment(b"%PDF-1.4 real terms", maintype="application", subtype="pdf", filename="terms.pdf")
    return m.as_bytes().replace(b"\n", b"\r\n")


def send(server: RunningServer, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("mx.supplier.test")
        c.starttls(context=server.tls.client_context())
        c.ehlo("mx.supplier.test")
        c.mail("billing@supplier.test")
        assert c.rcpt(BOB)[0] == 250
        code, text = c.data(data)
    server.wait_filed()
    return code, text


def imap_subjects(server: RunningServer, folder: str) -> list[str]:
    """The subjects in a folder, read by a real IMAP client as the user would."""
    conn = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls.client_context(), timeout=30)
    try:
        conn.login(BOB, BOB_PW)
        typ, _ = conn.select(folder, readonly=True)
        assert typ == "OK"
        typ, data = conn.uid("SEARCH", "ALL")
        uids = data[0].split()
        subjects = []
        for uid in uids:
            typ, fetched = conn.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            subjects.append(message_from_bytes(fetched[0][1])["Subject"])
        return subjects
    finally:
        conn.logout()


def imap_body(server: RunningServer, folder: str, index: int = -1) -> bytes:
    conn = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls.client_context(), timeout=30)
    try:
        conn.login(BOB, BOB_PW)
        conn.select(folder, readonly=True)
        uid = conn.uid("SEARCH", "ALL")[1][0].split()[index]
        return conn.uid("FETCH", uid, "(BODY.PEEK[])")[1][0][1]
    finally:
        conn.logout()


def quarantine_rows(server: RunningServer, *extra: str) -> list[list[str]]:
    code, out, err = server.cli("quarantine", "list", *extra)
    assert code == 0, err
    return [line.split("\t") for line in out.splitlines()[1:]]


@pytest.fixture
def quarantining(server_factory: Any, dns_server: DnsServer) -> RunningServer:
    return server_factory({**CHECKED, "content.attachment_action": "quarantine"})


def test_default_policy_rejects_an_executable_disguised_as_a_pdf(server_factory: Any, dns_server: DnsServer) -> None:
    server = server_factory(CHECKED)
    code, text = send(server, mail("rejected invoice"))
    assert code == 550 and b"executable_attachment" in text
    assert imap_subjects(server, "INBOX") == []


def test_quarantined_message_is_held_then_released_into_inbox(quarantining: RunningServer) -> None:
    server = quarantining
    code, _ = send(server, mail("held invoice"))
    assert code == 250
    assert imap_subjects(server, "INBOX") == [] and imap_subjects(server, "Junk") == []
    (row,) = quarantine_rows(server)
    qid, _created, state, users, _from, subject, reason = row
    assert (state, users, subject) == ("held", BOB, "held invoice")
    assert "rules executable_attachment" in reason and "invoice.pdf" in reason

    code, out, err = server.cli("quarantine", "show", qid)
    assert code == 0, err
    assert "Check: rules.executable_attachment: invoice.pdf: content is a Windows PE executable" in out
    assert "Subject: held invoice" in out

    code, out, err = server.cli("quarantine", "release", qid)
    assert code == 0, err
    assert out.strip() == f"released {qid} to {BOB}"
    assert imap_subjects(server, "INBOX") == ["held invoice"]
    assert quarantine_rows(server) == []
    assert server.cli("quarantine", "release", qid)[0] == 1  # once only
    assert [r[2] for r in quarantine_rows(server, "--all")] == ["released"]
    assert imap_body(server, "INBOX").startswith(b"Return-Path: <billing@supplier.test>\r\n")
    # The release is a training event: the spam classifier learns the message as ham for Bob.
    with sqlite3.connect(server.paths.database) as db:
        events = db.execute("SELECT user, label, source FROM training_events").fetchall()
    assert events == [(BOB, "ham", "quarantine_release")]


def test_delete_removes_a_held_message(quarantining: RunningServer) -> None:
    server = quarantining
    assert send(server, mail("to delete"))[0] == 250
    ((qid, *_),) = quarantine_rows(server)
    code, out, err = server.cli("quarantine", "delete", qid)
    assert (code, out.strip()) == (0, f"deleted {qid}"), err
    assert quarantine_rows(server) == []
    assert server.cli("quarantine", "release", qid)[0] == 1
    assert imap_subjects(server, "INBOX") == []


def test_clean_mail_still_reaches_the_inbox(quarantining: RunningServer) -> None:
    assert send(quarantining, mail("just terms", attachment=None))[0] == 250
    assert imap_subjects(quarantining, "INBOX") == ["just terms"]
    assert quarantine_rows(quarantining) == []


def test_digest_mail_lists_held_messages_once(quarantining: RunningServer) -> None:
    server = quarantining
    assert send(server, mail("first held"))[0] == 250
    assert send(server, mail("second held"))[0] == 250
    code, out, err = server.cli("quarantine", "digest")
    assert code == 0, err
    assert f"{BOB}\t2" in out
    assert imap_subjects(server, "INBOX") == ["Quarantine digest: 2 held messages"]
    body = imap_body(server, "INBOX").decode()
    assert "first held" in body and "second held" in body and "executable_attachment" in body
    code, out, _ = server.cli("quarantine", "digest")
    assert "digest sent to 0 users" in out  # nothing new since the last digest
    assert not list((server.paths.spool).glob("w-cli-*"))  # the CLI's own spool is retired


def test_strip_and_notify_delivers_the_rest(server_factory: Any, dns_server: DnsServer) -> None:
    server = server_factory({**CHECKED, "content.attachment_action": "strip"})
    assert send(server, mail("stripped invoice"))[0] == 250
    assert imap_subjects(server, "INBOX") == ["stripped invoice"]
    raw = imap_body(server, "INBOX")
    assert b"X-Mailwarden-Stripped: invoice.pdf" in raw
    assert b"The attachment invoice.pdf was removed by the mail server" in raw
    assert b"Please find the invoice attached." in raw and b'filename="terms.pdf"' in raw
    parsed = message_from_bytes(raw)
    payloads = [p.get_payload(decode=True) for p in parsed.walk() if not p.is_multipart()]
    assert PE not in payloads and b"%PDF-1.4 real terms" in payloads


def test_outbound_executable_from_a_user_is_held_in_the_queue(server_factory: Any) -> None:
    server = server_factory({})
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = ALICE, "partner@far.test", "tool"
    m.set_content("here")
    m.add_attachment(PE, maintype="application", subtype="octet-stream", filename="tool.exe")
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.ehlo("laptop")
        c.starttls(context=server.tls.client_context())
        c.ehlo("laptop")
        c.login(ALICE, ALICE_PW)
        assert c.sendmail(ALICE, ["partner@far.test"], m.as_bytes().replace(b"\n", b"\r\n")) == {}
    server.wait_filed()
    (entry,) = server.call(server.server.store.list_queue())
    assert entry.status == "held" and "rules=executable_attachment" in entry.last_error


def test_quarantine_filing_is_idempotent_on_replay(quarantining: RunningServer) -> None:
    store = quarantining.server.store
    item = QuarantineItem("REPLAYQID1", "x@far.test", ((BOB, BOB),), (), "test")
    batch = DeliveryBatch(quarantine=[(item, b"Subject: replay\r\n\r\nbody\r\n")])
    quarantining.call(store.deliver(batch))
    quarantining.call(store.deliver(batch))  # a spool replay after a crash
    assert [r[5] for r in quarantine_rows(quarantining)] == ["replay"]


def test_inspect_shows_rule_hits(tmp_path: Path, dns_server: DnsServer) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(mail("inspected"))
    code, out, err = run_cli("--dir", str(tmp_path), "inspect", str(path), "--ip", "192.0.2.1", "--helo", "mx.test")
    assert code == 0, err
    assert "Verdict: reject" in out
    assert "rules  executable_attachment" in out and "content is a Windows PE executable" in out


def test_inspect_names_display_name_spoof_of_a_local_user(instance: Any, tmp_path: Path, dns_server: DnsServer) -> None:
    path = tmp_path / "spoof.eml"
    path.write_bytes(
        b"From: Alice <alice.boss@freemail.test>\r\nTo: bob@example.test\r\nSubject: urgent\r\n\r\npay now\r\n"
    )
    code, out, err = run_cli(
        "--dir", str(instance.root), "inspect", str(path), "--ip", "192.0.2.1", "--helo", "mx.test"
    )
    assert code == 0, err
    assert "rules display_name_spoof (+3)" in out and "is a local user's name" in out
