"""The IMAP endpoint end to end: the real server, Python's imaplib over STARTTLS and implicit TLS, mail by SMTP."""

from __future__ import annotations

import imaplib
import logging
import re
import shutil
import smtplib
import socket
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import ALICE, ALICE_PW, BOB, BOB_PW, IMAP_LISTENERS, RunningServer, imaps


def message(subject: str, body: str = "Hello there.", to: str = BOB) -> bytes:
    return (
        f"From: Sender Name <sender@remote.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 06 Jan 2025 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@remote.test>\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def deliver(server: RunningServer, subject: str, to: str = BOB, body: str = "Hello there.") -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("client.remote.test")
        c.starttls(context=server.tls.client_context())
        c.ehlo("client.remote.test")
        assert c.sendmail("sender@remote.test", [to], message(subject, body, to)) == {}
    server.wait_filed()


def ok(result: tuple[str, list[Any]]) -> list[Any]:
    typ, data = result
    assert typ == "OK", data
    return data


def code_of(conn: imaplib.IMAP4, name: str) -> list[Any]:
    return conn.untagged_responses.get(name, [])


# ---- listeners and login ------------------------------------------------------------------------------------------


def test_login_over_starttls_and_refused_before_tls(imap_server: RunningServer) -> None:
    conn = imaplib.IMAP4("127.0.0.1", imap_server.ports["imap"], timeout=30)
    caps = conn.capabilities
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps and "AUTH=PLAIN" not in caps
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        conn.login(BOB, BOB_PW)
    conn.starttls(ssl_context=imap_server.tls.client_context())
    assert "LOGINDISABLED" not in conn.capabilities and "AUTH=PLAIN" in conn.capabilities
    ok(conn.login(BOB, BOB_PW))
    assert conn.state == "AUTH"
    assert conn.logout()[0] == "BYE"


def test_login_over_implicit_tls_and_authenticate_plain(imap_server: RunningServer) -> None:
    conn = imaps(imap_server)
    ok(conn.noop())
    conn.logout()
    conn = imaps(imap_server, user="")
    ok(conn.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{ALICE_PW}".encode()))
    ok(conn.select("INBOX"))
    conn.logout()


def test_plaintext_pipelined_behind_starttls_is_discarded(imap_server: RunningServer) -> None:
    ctx = imap_server.tls.client_context()
    with socket.create_connection(("127.0.0.1", imap_server.ports["imap"]), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"* OK")
        raw.sendall(b"a STARTTLS\r\nb LOGIN " + BOB.encode() + b' "' + BOB_PW.encode() + b'"\r\n')
        assert f.readline().startswith(b"a OK")
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"c CAPABILITY\r\n")
        tf = tls.makefile("rb")
        lines = [tf.readline(), tf.readline()]
        assert lines[0].startswith(b"* CAPABILITY") and lines[1].startswith(b"c OK")  # no answer to "b"
        tls.sendall(b"d NOOP\r\n")
        assert tf.readline().startswith(b"d OK")  # still not authenticated, but "b" never ran
        tls.sendall(b"e SELECT INBOX\r\n")
        assert tf.readline().startswith(b"e BAD")


def test_failed_login_is_logged_and_counted_by_the_guard(server_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    limits = {e: 1000 for e in ("auth_fail", "unknown_user", "relay", "protocol", "early_talker", "scanner")}
    limits["auth_fail"] = 3
    server = server_factory(IMAP_LISTENERS | {"guard.ip_thresholds": limits, "guard.sync_interval": 0.1})
    for i in range(2):
        conn = imaps(server, user="")
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login(f"user{i}@example.test", "wrong guess")
        conn.logout()
    conn = imaps(server, user="")
    with pytest.raises(imaplib.IMAP4.abort):  # the third failure bans: * BYE and the connection ends
        conn.login("user2@example.test", "wrong guess")
    fails = [r.getMessage() for r in caplog.records if "event=auth_fail" in r.getMessage()]
    assert len(fails) == 3
    assert all(re.search(r"proto=imap ip=127\.0\.0\.1 user=user\d@example\.test$", f) for f in fails)
    # banned: refused at connect with * BYE
    with pytest.raises(imaplib.IMAP4.error, match="banned"):
        imaps(server, user="")
    code, out, _ = server.cli("ban", "list")
    assert code == 0 and "127.0.0.1" in out


# ---- mailboxes ------------------------------------------------------------------------------------------------------


def test_list_shows_special_use_and_namespace(bob: imaplib.IMAP4_SSL) -> None:
    lines = [line.decode() for line in ok(bob.list())]
    assert '(\\HasNoChildren) "/" INBOX' in lines
    for name, flag in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Junk", "\\Junk"), ("Trash", "\\Trash")):
        assert f'(\\HasNoChildren {flag}) "/" {name}' in lines
    assert '(\\HasNoChildren \\Archive) "/" Archive' in lines
    special = ok(bob._simple_command("LIST", "(SPECIAL-USE)", '""', "*"))
    assert len(bob.untagged_responses.pop("LIST", [])) == 5 and special
    assert ok(bob.namespace()) == [b'(("" "/")) NIL NIL']
    assert len(ok(bob.lsub())) == 6


def test_create_rename_delete_subscribe_and_status(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.create("Projects/2025"))
    ok(bob.create("Projects"))
    assert bob.create("Projects")[0] == "NO"
    names = [line.decode() for line in ok(bob.list('""', "Projects*"))]
    assert names == ['(\\HasChildren) "/" Projects', '(\\HasNoChildren) "/" Projects/2025']
    ok(bob.rename("Projects", "Work"))
    names = [line.decode() for line in ok(bob.list('""', "*"))]
    assert '(\\HasChildren) "/" Work' in names and '(\\HasNoChildren) "/" Work/2025' in names
    assert not any("Projects" in n for n in names)
    ok(bob.unsubscribe("Work/2025"))
    assert not any(b"Work/2025" in line for line in ok(bob.lsub()))
    ok(bob.delete("Work/2025"))
    assert bob.delete("INBOX")[0] == "NO" and bob.delete("Sent")[0] == "NO"
    assert bob.select("Work/2025")[0] == "NO"
    status = ok(bob.status("Work", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)"))[0].decode()
    assert re.fullmatch(r"Work \(MESSAGES 0 UIDNEXT 1 UIDVALIDITY \d+ UNSEEN 0\)", status)
    ok(bob.create("Caf\u00e9".encode("utf-7").replace(b"+", b"&").decode()))  # modified UTF-7 round trip
    ok(bob.getquotaroot("INBOX"))


# ---- messages -------------------------------------------------------------------------------------------------------


def test_select_fetch_store_search_after_smtp_delivery(imap_server: RunningServer) -> None:
    deliver(imap_server, "first message")
    deliver(imap_server, "second message", body="Body with needle inside.")
    conn = imaps(imap_server)
    assert ok(conn.select("INBOX")) == [b"2"]
    assert code_of(conn, "UIDNEXT") == [b"3"] and re.fullmatch(rb"\d+", code_of(conn, "UIDVALIDITY")[0])
    assert code_of(conn, "PERMANENTFLAGS")
    data = ok(conn.fetch("1:2", "(UID FLAGS RFC822.SIZE INTERNALDATE)"))
    assert re.match(rb"1 \(UID 1 FLAGS \(\) RFC822\.SIZE \d+ INTERNALDATE \"", data[0])
    env = ok(conn.fetch("1", "(ENVELOPE)"))[0]
    assert b'"first message"' in env and b'(("Sender Name" NIL "sender" "remote.test"))' in env
    assert b'(NIL NIL "bob" "example.test")' in env and b"<first.message@remote.test>" in env
    # BODY.PEEK does not set \Seen
    peek = ok(conn.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    assert peek[0][1] == b"Subject: first message\r\n\r\n"
    assert ok(conn.fetch("1", "(FLAGS)")) == [b"1 (FLAGS ())"]
    partial = ok(conn.fetch("2", "(BODY.PEEK[TEXT]<5.4>)"))
    assert partial[0][1] == b"with"
    structure = ok(conn.fetch("1", "(BODYSTRUCTURE)"))[0]
    assert b'BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT"' in structure
    # BODY[] sets \Seen and reports it
    full = ok(conn.fetch("1", "(BODY[])"))
    assert full[0][1].endswith(b"\r\n\r\nHello there.\r\n") and b"Return-Path:" in full[0][1]
    assert b"\\Seen" in full[0][0] or b"\\Seen" in full[1]
    assert ok(conn.fetch("1", "(FLAGS)")) == [b"1 (FLAGS (\\Seen))"]
    rfc822 = ok(conn.uid("FETCH", "2", "(RFC822.HEADER)"))
    assert b"UID 2" in rfc822[0][0] and rfc822[0][1].endswith(b"\r\n\r\n")
    # STORE
    assert ok(conn.store("2", "+FLAGS", "(\\Flagged $Work)")) == [b"2 (FLAGS (\\Flagged $Work))"]
    assert ok(conn.uid("STORE", "2", "-FLAGS.SILENT", "($Work)")) == [None]
    assert ok(conn.fetch("2", "(FLAGS)")) == [b"2 (FLAGS (\\Flagged))"]
    # SEARCH
    assert ok(conn.search(None, "ALL")) == [b"1 2"]
    assert ok(conn.search(None, "SEEN")) == [b"1"]
    assert ok(conn.search(None, "UNSEEN")) == [b"2"]
    assert ok(conn.search(None, "FLAGGED")) == [b"2"]
    assert ok(conn.search(None, "SUBJECT", '"second"')) == [b"2"]
    assert ok(conn.search(None, "FROM", "sender@remote")) == [b"1 2"]
    assert ok(conn.search(None, "TO", "bob@")) == [b"1 2"]
    assert ok(conn.search(None, "BODY", "needle")) == [b"2"]
    assert ok(conn.search(None, "NOT", "SEEN")) == [b"2"]
    assert ok(conn.search(None, "OR", "SEEN", "FLAGGED")) == [b"1 2"]
    assert ok(conn.search(None, "SINCE", "1-Jan-2020")) == [b"1 2"]
    assert ok(conn.search(None, "BEFORE", "1-Jan-2020")) == [b""]
    assert ok(conn.search("UTF-8", "2")) == [b"2"]
    assert ok(conn.uid("SEARCH", "UID", "2:*")) == [b"2"]
    assert ok(conn.search(None, "DELETED")) == [b""]
    conn.logout()


def test_append_copy_move_expunge_with_uidplus(bob: imaplib.IMAP4_SSL) -> None:
    typ, _data = bob.append("Drafts", "(\\Draft)", imaplib.Time2Internaldate(time.time()), message("draft one"))
    assert typ == "OK"
    _validity, uid = code_of(bob, "APPENDUID")[-1].split()
    assert uid == b"1"
    assert bob.append("Nowhere", None, None, message("x"))[0] == "NO"
    for i in range(3):
        ok(bob.append("INBOX", None, None, message(f"inbox {i}")))
    ok(bob.select("INBOX"))
    assert ok(bob.copy("1:2", "Archive"))
    copyuid = code_of(bob, "COPYUID")[-1].split()
    assert copyuid[1:] == [b"1:2", b"1:2"]
    bob.untagged_responses.clear()
    ok(bob.uid("MOVE", "3", "Trash"))
    assert code_of(bob, "COPYUID")[-1].split()[1:] == [b"3", b"1"]
    assert code_of(bob, "EXPUNGE") == [b"3"]
    ok(bob.store("1", "+FLAGS", "\\Deleted"))
    bob.untagged_responses.clear()
    assert ok(bob.expunge()) == [b"1"]
    assert ok(bob.search(None, "ALL")) == [b"1"]
    assert ok(bob.fetch("1", "(UID)")) == [b"1 (UID 2)"]
    ok(bob.select("Archive", readonly=True))
    assert ok(bob.fetch("1:*", "(UID)")) == [b"1 (UID 1)", b"2 (UID 2)"]
    assert bob.store("1", "+FLAGS", "\\Deleted")[0] == "NO"
    ok(bob.unselect())
    status = ok(bob.status("Drafts", "(MESSAGES UNSEEN)"))[0]
    assert status == b"Drafts (MESSAGES 1 UNSEEN 1)"
    ok(bob.select("Drafts"))
    assert ok(bob.fetch("1", "(FLAGS)")) == [b"1 (FLAGS (\\Draft))"]
    ok(bob.close())


def test_uids_never_go_backwards_after_expunge_and_new_delivery(imap_server: RunningServer) -> None:
    deliver(imap_server, "one")
    deliver(imap_server, "two")
    conn = imaps(imap_server)
    ok(conn.select("INBOX"))
    ok(conn.store("1:*", "+FLAGS", "\\Deleted"))
    ok(conn.expunge())
    validity = code_of(conn, "UIDVALIDITY")[-1]
    deliver(imap_server, "three")
    ok(conn.noop())
    assert ok(conn.uid("FETCH", "1:*", "(UID)")) == [b"1 (UID 3)"]
    ok(conn.select("INBOX"))
    assert code_of(conn, "UIDVALIDITY")[-1] == validity and code_of(conn, "UIDNEXT")[-1] == b"4"
    # a mailbox deleted and created again gets a new UIDVALIDITY at once
    ok(conn.create("Tmp"))
    first = ok(conn.status("Tmp", "(UIDVALIDITY)"))[0]
    ok(conn.delete("Tmp"))
    ok(conn.create("Tmp"))
    assert ok(conn.status("Tmp", "(UIDVALIDITY)"))[0] != first
    conn.logout()


def test_two_sessions_see_each_others_changes(imap_server: RunningServer) -> None:
    deliver(imap_server, "shared one")
    a, b = imaps(imap_server), imaps(imap_server)
    ok(a.select("INBOX"))
    ok(b.select("INBOX"))
    deliver(imap_server, "shared two")
    a.untagged_responses.clear()
    ok(a.noop())
    assert code_of(a, "EXISTS") == [b"2"]
    ok(b.store("1", "+FLAGS", "(\\Deleted)"))
    a.untagged_responses.clear()
    ok(a.noop())
    assert code_of(a, "FETCH") == [b"1 (FLAGS (\\Deleted))"]
    ok(b.expunge())
    a.untagged_responses.clear()
    ok(a.noop())
    assert code_of(a, "EXPUNGE") == [b"1"] and code_of(a, "EXISTS") in ([], [b"1"])
    assert ok(a.fetch("1", "(UID)")) == [b"1 (UID 2)"]
    a.logout()
    b.logout()


def test_idle_wakes_on_new_delivery(imap_server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", imap_server.ports["imaps"]), timeout=10) as raw:
        tls = imap_server.tls.client_context().wrap_socket(raw, server_hostname="localhost")
        f = tls.makefile("rb")
        f.readline()
        tls.sendall(f'a LOGIN {BOB} "{BOB_PW}"\r\nb SELECT INBOX\r\n'.encode())
        while not f.readline().startswith(b"b OK"):
            pass
        tls.sendall(b"c IDLE\r\n")
        assert f.readline().startswith(b"+ ")
        started = time.monotonic()
        deliver(imap_server, "wake up")
        line = f.readline()
        assert line == b"* 1 EXISTS\r\n" and time.monotonic() - started < 4  # not the periodic recheck
        tls.sendall(b"DONE\r\n")
        assert f.readline().startswith(b"c OK")


def test_curl_lists_the_mailbox(imap_server: RunningServer) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    deliver(imap_server, "for curl")
    port = imap_server.ports["imaps"]
    out = subprocess.run(
        ["curl", "-sS", "-k", f"imaps://127.0.0.1:{port}/INBOX", "-u", f"{BOB}:{BOB_PW}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        ["curl", "-sS", "-k", f"imaps://127.0.0.1:{port}/INBOX;UID=1", "-u", f"{BOB}:{BOB_PW}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "Subject: for curl" in out.stdout
    list_out = subprocess.run(
        ["curl", "-sS", "-k", f"imaps://127.0.0.1:{port}/", "-u", f"{BOB}:{BOB_PW}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "INBOX" in list_out.stdout and "\\Junk" in list_out.stdout


def test_bad_input_gets_bad_and_the_session_survives(bob: imaplib.IMAP4_SSL) -> None:
    sock = bob.socket()
    sock.sendall(b"x FETCH\r\n")
    assert bob._get_line().startswith(b"x BAD")
    sock.sendall(b"y SELECT {4294967296}\r\n")
    assert bob._get_line().startswith(b"y BAD")
