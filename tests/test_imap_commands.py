"""Command coverage with Python's imaplib: one behaviour per test, asserting what a client sees.

tests/test_imap_server.py holds the first end-to-end tests (login, LIST, FETCH, STORE, SEARCH, APPEND/COPY/MOVE,
two sessions, IDLE); this file covers the rest of the command list in docs/imap.md, and the concurrency rules.
"""

from __future__ import annotations

import imaplib
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BOB, BOB_PW, RunningServer, TlsMaterial, make_instance, start_server, stop_server
from tests.test_imap_server import IMAP_LISTENERS, code_of, deliver, imaps, message, ok


def fill(conn: imaplib.IMAP4, count: int, box: str = "INBOX") -> None:
    for i in range(count):
        ok(conn.append(box, None, None, message(f"message {i + 1}")))


def raw_session(server: RunningServer) -> tuple[Any, Any]:
    sock = socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=15)
    tls = server.tls.client_context().wrap_socket(sock, server_hostname="localhost")
    f = tls.makefile("rb")
    assert f.readline().startswith(b"* OK")
    return tls, f


def read_until(f: Any, tag: bytes) -> list[bytes]:
    lines = []
    while True:
        line = f.readline()
        assert line, lines
        lines.append(line)
        if line.startswith(tag + b" "):
            return lines


# ---- session ----------------------------------------------------------------------------------------------------------


def test_capability_after_login_lists_extensions_and_no_auth(bob: imaplib.IMAP4_SSL) -> None:
    caps = ok(bob.capability())[0].decode().split()
    for ext in ("IMAP4rev1", "LITERAL+", "IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "SPECIAL-USE", "ENABLE", "ID"):
        assert ext in caps
    assert not any(c.startswith("AUTH=") for c in caps) and "STARTTLS" not in caps


def test_enable_answers_enabled_with_nothing_unknown(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.enable("X-NO-SUCH-EXTENSION"))
    assert code_of(bob, "ENABLED") in ([b""], [None])


def test_id_names_the_server(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.xatom("ID", '("name" "imaplib" "version" "3.11")'))
    assert code_of(bob, "ID") == [b'("name" "Mailwarden")']


def test_noop_before_login_is_fine_and_select_is_not(imap_server: RunningServer) -> None:
    conn = imaps(imap_server, user="")
    ok(conn.noop())
    with pytest.raises(imaplib.IMAP4.error):
        conn._simple_command("SELECT", "INBOX")  # imaplib refuses in its own state machine otherwise
    conn.logout()


def test_logout_says_bye_and_closes(bob: imaplib.IMAP4_SSL) -> None:
    typ, data = bob.logout()
    assert typ == "BYE" and b"logging out" in data[0]
    assert bob.state == "LOGOUT"


def test_shutdown_says_bye_to_connected_clients(tmp_path: Path, tls: TlsMaterial) -> None:
    server = start_server(make_instance(tmp_path / "instance", tls, IMAP_LISTENERS), tls)
    try:
        tls_sock, f = raw_session(server)
        tls_sock.sendall(f'a LOGIN {BOB} "{BOB_PW}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
        read_until(f, b"b")
        assert f.readline().startswith(b"+ ")
    finally:
        started = time.monotonic()
        stop_server(server)
    assert f.readline() == b"* BYE Server shutting down\r\n"
    assert f.readline() == b""  # then the connection ends
    assert time.monotonic() - started < 15


# ---- mailboxes --------------------------------------------------------------------------------------------------------


def test_subscribe_puts_a_mailbox_back_in_lsub(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.create("Lists"))
    ok(bob.unsubscribe("Lists"))
    assert not any(b"Lists" in line for line in ok(bob.lsub()))
    ok(bob.subscribe("Lists"))
    assert b'(\\HasNoChildren) "/" Lists' in ok(bob.lsub('""', "L*"))


def test_subscribe_to_a_missing_mailbox_is_refused(bob: imaplib.IMAP4_SSL) -> None:
    typ, data = bob.subscribe("Missing")
    assert typ == "NO" and b"[NONEXISTENT]" in data[0]


def test_list_return_special_use_and_percent_wildcard(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.create("Work/Reports"))
    ok(bob._simple_command("LIST", '""', "%", "RETURN", "(SPECIAL-USE)"))
    lines = bob.untagged_responses.pop("LIST")
    assert b'(\\HasNoChildren \\Sent) "/" Sent' in lines and not any(b"Reports" in x for x in lines)
    assert ok(bob.list('""', "Work/%")) == [b'(\\HasNoChildren) "/" Work/Reports']


def test_list_shows_a_missing_parent_as_noselect(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.create("Clients/Acme"))  # "Clients" itself was never created
    assert ok(bob.list('""', "Cl*")) == [
        b'(\\Noselect \\HasChildren) "/" Clients',
        b'(\\HasNoChildren) "/" Clients/Acme',
    ]
    assert b'(\\Noselect \\HasChildren) "/" Clients' in ok(bob.list('""', "%"))
    assert bob.select("Clients")[0] == "NO"
    ok(bob.create("Clients"))  # creating it later makes it a real mailbox
    assert ok(bob.list('""', "Clients")) == [b'(\\HasChildren) "/" Clients']


def test_list_empty_pattern_gives_the_delimiter(bob: imaplib.IMAP4_SSL) -> None:
    assert ok(bob.list('""', '""')) == [b'(\\Noselect) "/" ""']


def test_inbox_is_case_insensitive(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1, "inbox")
    assert ok(bob.select("Inbox")) == [b"1"]
    assert ok(bob.status("iNbOx", "(MESSAGES)")) == [b"INBOX (MESSAGES 1)"]


def test_rename_keeps_messages(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.create("Old"))
    fill(bob, 2, "Old")
    ok(bob.rename("Old", "New"))
    assert ok(bob.status("New", "(MESSAGES)")) == [b"New (MESSAGES 2)"]
    assert bob.status("Old", "(MESSAGES)")[0] == "NO"


def test_status_counts_size_and_deleted(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 2)
    ok(bob.select("INBOX"))
    ok(bob.store("1", "+FLAGS", "(\\Deleted \\Seen)"))
    size = sum(int(re.search(rb"RFC822\.SIZE (\d+)", x).group(1)) for x in ok(bob.fetch("1:2", "(RFC822.SIZE)")))
    line = ok(bob.status("INBOX", "(MESSAGES UNSEEN DELETED SIZE RECENT)"))[0]
    assert line == b"INBOX (MESSAGES 2 UNSEEN 1 DELETED 1 SIZE %d RECENT 0)" % size


def test_delete_selected_mailbox_unselects_it(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.create("Scratch"))
    ok(bob.select("Scratch"))
    ok(bob.delete("Scratch"))
    with pytest.raises(imaplib.IMAP4.error, match="no mailbox selected"):
        bob._simple_command("FETCH", "1", "(FLAGS)")


def test_create_in_utf7_lists_back_the_same_name(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.create("&AMk-t&AOk-"))  # "Été"
    assert ok(bob.list('""', "&AMk-*")) == [b'(\\HasNoChildren) "/" &AMk-t&AOk-']
    with pytest.raises(imaplib.IMAP4.error, match="BAD"):
        bob.create("&AMk")  # broken modified UTF-7


# ---- messages ---------------------------------------------------------------------------------------------------------


def test_check_is_a_checkpoint_that_reports_new_mail(imap_server: RunningServer, bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.select("INBOX"))
    deliver(imap_server, "during check")
    bob.untagged_responses.clear()
    ok(bob.check())
    assert code_of(bob, "EXISTS") == [b"1"]


def test_close_expunges_silently(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 3)
    ok(bob.select("INBOX"))
    ok(bob.store("2", "+FLAGS.SILENT", "(\\Deleted)"))
    bob.untagged_responses.clear()
    ok(bob.close())
    assert code_of(bob, "EXPUNGE") == []  # CLOSE sends no EXPUNGE responses
    assert ok(bob.status("INBOX", "(MESSAGES)")) == [b"INBOX (MESSAGES 2)"]


def test_close_after_examine_does_not_expunge(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.select("INBOX"))
    ok(bob.store("1", "+FLAGS", "(\\Deleted)"))
    ok(bob.select("INBOX", readonly=True))
    ok(bob.close())
    assert ok(bob.status("INBOX", "(MESSAGES DELETED)")) == [b"INBOX (MESSAGES 1 DELETED 1)"]


def test_unselect_keeps_deleted_messages(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.select("INBOX"))
    ok(bob.store("1", "+FLAGS", "(\\Deleted)"))
    ok(bob.unselect())
    assert ok(bob.status("INBOX", "(MESSAGES)")) == [b"INBOX (MESSAGES 1)"]


def test_examine_is_read_only(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.select("INBOX", readonly=True))
    assert code_of(bob, "READ-ONLY") == [b""]
    assert code_of(bob, "PERMANENTFLAGS") == [b"()"]
    ok(bob.fetch("1", "(BODY[])"))  # BODY[] on a read-only mailbox does not set \Seen
    assert ok(bob.fetch("1", "(FLAGS)")) == [b"1 (FLAGS ())"]
    assert bob.expunge()[0] == "NO"


def test_uid_expunge_removes_only_the_named_uids(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 3)
    ok(bob.select("INBOX"))
    ok(bob.store("1:3", "+FLAGS", "(\\Deleted)"))
    bob.untagged_responses.clear()
    ok(bob.uid("EXPUNGE", "2"))
    assert code_of(bob, "EXPUNGE") == [b"2"]
    assert ok(bob.uid("SEARCH", "ALL")) == [b"1 3"]


def test_uid_copy_reports_copyuid_and_keeps_the_source(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 3)
    ok(bob.select("INBOX"))
    ok(bob.uid("COPY", "1,3", "Archive"))
    validity, src, dst = code_of(bob, "COPYUID")[-1].split()
    assert (src, dst) == (b"1,3", b"1:2")
    assert ok(bob.status("Archive", "(UIDVALIDITY MESSAGES)")) == [b"Archive (UIDVALIDITY %s MESSAGES 2)" % validity]
    assert ok(bob.search(None, "ALL")) == [b"1 2 3"]


def test_copy_and_move_to_a_missing_mailbox_say_trycreate(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.select("INBOX"))
    for command in ("COPY", "MOVE"):
        typ, data = bob._simple_command(command, "1", "Nowhere")
        assert typ == "NO" and b"[TRYCREATE]" in data[0]
    assert ok(bob.search(None, "ALL")) == [b"1"]


def test_append_keeps_flags_and_internaldate(bob: imaplib.IMAP4_SSL) -> None:
    when = '"01-Feb-2024 12:34:56 +0100"'
    ok(bob.append("INBOX", "(\\Seen $Label1)", when, message("dated")))
    ok(bob.select("INBOX"))
    assert ok(bob.fetch("1", "(FLAGS INTERNALDATE)")) == [
        b'1 (FLAGS (\\Seen $Label1) INTERNALDATE " 1-Feb-2024 11:34:56 +0000")'  # date-day-fixed
    ]
    assert ok(bob.search(None, "ON", "1-Feb-2024")) == [b"1"]


def test_literal_plus_append_needs_no_continuation(imap_server: RunningServer) -> None:
    tls, f = raw_session(imap_server)
    body = message("literal plus")
    tls.sendall(
        b"a LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(BOB), BOB.encode(), len(BOB_PW), BOB_PW.encode())
        + b"b APPEND INBOX (\\Flagged) {%d+}\r\n%s\r\nc NOOP\r\n" % (len(body), body)
    )
    lines = read_until(f, b"a") + read_until(f, b"b") + read_until(f, b"c")
    assert not any(line.startswith(b"+") for line in lines)  # the server never asked for the literals
    assert lines[-1].startswith(b"c OK") and any(re.match(rb"b OK \[APPENDUID \d+ 1\]", x) for x in lines)
    tls.close()


def test_synchronizing_literal_gets_a_continuation(imap_server: RunningServer) -> None:
    tls, f = raw_session(imap_server)
    tls.sendall(b"a LOGIN {%d}\r\n" % len(BOB))
    assert f.readline().startswith(b"+ ")
    tls.sendall(BOB.encode() + f' "{BOB_PW}"\r\n'.encode())
    assert read_until(f, b"a")[-1].startswith(b"a OK")
    tls.close()


# ---- FETCH ------------------------------------------------------------------------------------------------------------

MULTIPART = (
    b"From: Ann <ann@remote.test>\r\nTo: bob@example.test\r\nCc: Carl <carl@remote.test>\r\n"
    b"Subject: parts\r\nDate: Tue, 07 Jan 2025 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Caf\xc3\xa9 text part\r\n--XX\r\nContent-Type: application/octet-stream; name=a.bin\r\n"
    b"Content-Disposition: attachment; filename=a.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"AAECAw==\r\n--XX--\r\n"
)


@pytest.fixture
def multipart(bob: imaplib.IMAP4_SSL) -> imaplib.IMAP4_SSL:
    ok(bob.append("INBOX", None, None, MULTIPART))
    ok(bob.select("INBOX"))
    return bob


def test_bodystructure_of_a_multipart_message(multipart: imaplib.IMAP4_SSL) -> None:
    data = ok(multipart.fetch("1", "(BODYSTRUCTURE)"))[0]
    assert data.startswith(b'1 (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "8BIT" ')
    assert b'("APPLICATION" "OCTET-STREAM" ("NAME" "a.bin") NIL NIL "BASE64" 8' in data
    assert b'"MIXED" ("BOUNDARY" "XX")' in data


def test_body_parts_by_number_and_mime_header(multipart: imaplib.IMAP4_SSL) -> None:
    assert ok(multipart.fetch("1", "(BODY.PEEK[1])"))[0][1] == "Café text part".encode()
    assert ok(multipart.fetch("1", "(BODY.PEEK[2])"))[0][1] == b"AAECAw=="
    mime = ok(multipart.fetch("1", "(BODY.PEEK[2.MIME])"))[0][1]
    assert mime.startswith(b"Content-Type: application/octet-stream") and mime.endswith(b"\r\n\r\n")


def test_header_fields_not_drops_the_named_fields(multipart: imaplib.IMAP4_SSL) -> None:
    header = ok(multipart.fetch("1", "(BODY.PEEK[HEADER.FIELDS.NOT (CONTENT-TYPE MIME-VERSION DATE)])"))[0][1]
    assert b"Subject: parts" in header and b"Content-Type" not in header and b"Date:" not in header


def test_partial_fetch_past_the_end_is_empty_and_origin_is_echoed(multipart: imaplib.IMAP4_SSL) -> None:
    data = ok(multipart.fetch("1", "(BODY.PEEK[]<0.4> BODY.PEEK[TEXT]<100000.10>)"))
    assert data[0][0].endswith(b"BODY[]<0> {4}") and data[0][1] == b"From"
    assert data[1][0].endswith(b"BODY[TEXT]<100000> {0}") or data[1][0].endswith(b'BODY[TEXT]<100000> ""')


def test_envelope_lists_cc_and_the_sender(multipart: imaplib.IMAP4_SSL) -> None:
    env = ok(multipart.fetch("1", "(ENVELOPE)"))[0]
    assert b'(("Carl" NIL "carl" "remote.test"))' in env
    assert env.count(b'(("Ann" NIL "ann" "remote.test"))') == 3  # From, Sender and Reply-To default to From


def test_fetch_macros_all_fast_full(multipart: imaplib.IMAP4_SSL) -> None:
    fast = ok(multipart.fetch("1", "FAST"))[0]
    assert b"FLAGS" in fast and b"INTERNALDATE" in fast and b"RFC822.SIZE" in fast and b"ENVELOPE" not in fast
    assert b"ENVELOPE" in ok(multipart.fetch("1", "ALL"))[0]
    full = ok(multipart.fetch("1", "FULL"))[0]
    assert b"ENVELOPE" in full and b" BODY (" in full


def test_rfc822_sets_seen_and_rfc822_header_does_not(multipart: imaplib.IMAP4_SSL) -> None:
    ok(multipart.fetch("1", "(RFC822.HEADER)"))
    assert ok(multipart.fetch("1", "(FLAGS)")) == [b"1 (FLAGS ())"]
    data = ok(multipart.fetch("1", "(RFC822)"))
    assert data[0][1] == MULTIPART or data[0][1].endswith(MULTIPART)
    assert ok(multipart.fetch("1", "(FLAGS)")) == [b"1 (FLAGS (\\Seen))"]


def test_fetch_of_a_missing_sequence_number_is_bad(multipart: imaplib.IMAP4_SSL) -> None:
    with pytest.raises(imaplib.IMAP4.error, match="invalid message sequence number"):
        multipart._simple_command("FETCH", "5", "(FLAGS)")
    assert ok(multipart.uid("FETCH", "5:9", "(FLAGS)")) == [None]  # UID ranges may name nothing


def test_uid_fetch_star_returns_the_last_message(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 3)
    ok(bob.select("INBOX"))
    assert ok(bob.uid("FETCH", "10:*", "(FLAGS)")) == [b"3 (UID 3 FLAGS ())"]  # "*" is the largest UID


# ---- SEARCH -----------------------------------------------------------------------------------------------------------

UTF8_MESSAGE = (
    "From: =?utf-8?q?Jos=C3=A9?= <jose@remote.test>\r\nTo: bob@example.test\r\n"
    "Subject: =?utf-8?q?Caf=C3=A9_cr=C3=A8me?=\r\nDate: Wed, 08 Jan 2025 08:00:00 +0000\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Un texte na\u00efve.\r\n"
).encode()


def search_utf8(conn: imaplib.IMAP4, key: str, value: str) -> list[Any]:
    conn.literal = value.encode()
    return ok(conn.search("UTF-8", key))


def test_search_utf8_subject_in_a_literal(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.append("INBOX", None, None, UTF8_MESSAGE))
    ok(bob.select("INBOX"))
    assert search_utf8(bob, "SUBJECT", "café") == [b"2"]


def test_search_utf8_from_display_name(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.append("INBOX", None, None, UTF8_MESSAGE))
    ok(bob.select("INBOX"))
    assert search_utf8(bob, "FROM", "José") == [b"1"]


def test_search_utf8_body(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.append("INBOX", None, None, UTF8_MESSAGE))
    ok(bob.select("INBOX"))
    assert search_utf8(bob, "BODY", "naïve") == [b"2"]


def test_search_utf8_to_display_name_in_an_encoded_word(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.append("INBOX", None, None, UTF8_MESSAGE.replace(b"To: bob@", b"To: =?utf-8?q?B=C3=B6b?= <bob@")))
    ok(bob.select("INBOX"))
    assert search_utf8(bob, "TO", "Böb") == [b"2"]


def test_search_unknown_charset_says_badcharset(bob: imaplib.IMAP4_SSL) -> None:
    ok(bob.select("INBOX"))
    typ, data = bob._simple_command("SEARCH", "CHARSET", "KOI8-R", "ALL")
    assert typ == "NO" and b"[BADCHARSET" in data[0]


@pytest.fixture
def searchable(bob: imaplib.IMAP4_SSL) -> imaplib.IMAP4_SSL:
    ok(bob.append("INBOX", "(\\Answered)", '"02-Jan-2025 10:00:00 +0000"', message("small one", "x")))
    ok(bob.append("INBOX", "(\\Draft $Todo)", '"03-Jan-2025 10:00:00 +0000"', MULTIPART))
    ok(bob.append("INBOX", None, '"04-Jan-2025 10:00:00 +0000"', message("big one", "y" * 5000)))
    ok(bob.select("INBOX"))
    return bob


@pytest.mark.parametrize(
    ("criteria", "hits"),
    [
        (("ANSWERED",), b"1"),
        (("UNANSWERED",), b"2 3"),
        (("DRAFT",), b"2"),
        (("KEYWORD", "$Todo"), b"2"),
        (("UNKEYWORD", "$Todo"), b"1 3"),
        (("LARGER", "4000"), b"3"),
        (("SMALLER", "400"), b"1"),
        (("CC", "carl"), b"2"),
        (("HEADER", "Content-Type", "multipart"), b"2"),
        (("HEADER", "MIME-Version", '""'), b"2"),  # empty string: has the field
        (("TEXT", "AAECAw"), b"2"),
        (("ON", "3-Jan-2025"), b"2"),
        (("SINCE", "3-Jan-2025"), b"2 3"),
        (("BEFORE", "3-Jan-2025"), b"1"),
        (("SENTON", "7-Jan-2025"), b"2"),
        (("SENTBEFORE", "7-Jan-2025"), b"1 3"),
        (("SENTSINCE", "7-Jan-2025"), b"2"),
        (("2:*",), b"2 3"),
        (("UID", "1,3"), b"1 3"),
        (("OR", "DRAFT", "(ANSWERED LARGER 10)"), b"1 2"),
        (("NOT", "(OR", "DRAFT", "ANSWERED)"), b"3"),
        (("NEW",), b""),
        (("OLD",), b"1 2 3"),
    ],
)
def test_search_key(searchable: imaplib.IMAP4_SSL, criteria: tuple[str, ...], hits: bytes) -> None:
    assert ok(searchable.search("UTF-8", *criteria)) == [hits]


def test_uid_search_answers_uids(searchable: imaplib.IMAP4_SSL) -> None:
    ok(searchable.store("1", "+FLAGS", "(\\Deleted)"))
    ok(searchable.expunge())
    assert ok(searchable.search(None, "ALL")) == [b"1 2"]
    assert ok(searchable.uid("SEARCH", "ALL")) == [b"2 3"]


# ---- STORE ------------------------------------------------------------------------------------------------------------


def test_store_replace_flags_and_recent_is_ignored(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.select("INBOX"))
    ok(bob.store("1", "+FLAGS", "(\\Seen \\Flagged)"))
    assert ok(bob.store("1", "FLAGS", "(\\Answered \\Recent)")) == [b"1 (FLAGS (\\Answered))"]


def test_uid_store_answers_with_the_uid(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 2)
    ok(bob.select("INBOX"))
    assert ok(bob.uid("STORE", "2", "+FLAGS", "(\\Seen)")) == [b"2 (FLAGS (\\Seen) UID 2)"]


def test_store_flags_are_case_insensitive_system_flags(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 1)
    ok(bob.select("INBOX"))
    assert ok(bob.store("1", "+FLAGS", "(\\seen \\FLAGGED)")) == [b"1 (FLAGS (\\Seen \\Flagged))"]


# ---- concurrency ------------------------------------------------------------------------------------------------------


def test_idle_reports_another_sessions_flag_change_and_expunge(imap_server: RunningServer) -> None:
    other = imaps(imap_server)
    fill(other, 2)
    tls, f = raw_session(imap_server)
    tls.sendall(f'a LOGIN {BOB} "{BOB_PW}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
    read_until(f, b"b")
    assert f.readline().startswith(b"+ ")
    ok(other.select("INBOX"))
    ok(other.store("2", "+FLAGS", "(\\Flagged)"))
    assert f.readline() == b"* 2 FETCH (FLAGS (\\Flagged))\r\n"
    ok(other.store("1", "+FLAGS", "(\\Deleted)"))
    assert f.readline() == b"* 1 FETCH (FLAGS (\\Deleted))\r\n"
    ok(other.expunge())
    assert f.readline() == b"* 1 EXPUNGE\r\n"
    tls.sendall(b"DONE\r\n")
    assert f.readline().startswith(b"c OK")
    other.logout()
    tls.close()


def test_idle_reports_an_append_by_another_session(imap_server: RunningServer) -> None:
    tls, f = raw_session(imap_server)
    tls.sendall(f'a LOGIN {BOB} "{BOB_PW}"\r\nb SELECT Drafts\r\nc IDLE\r\n'.encode())
    read_until(f, b"b")
    assert f.readline().startswith(b"+ ")
    other = imaps(imap_server)
    ok(other.append("Drafts", None, None, message("draft")))
    assert f.readline() == b"* 1 EXISTS\r\n"
    tls.sendall(b"DONE\r\n")
    assert f.readline().startswith(b"c OK")
    other.logout()
    tls.close()


def test_non_uid_fetch_defers_expunge_until_noop(imap_server: RunningServer) -> None:
    a, b = imaps(imap_server), imaps(imap_server)
    fill(a, 2)
    ok(a.select("INBOX"))
    ok(b.select("INBOX"))
    ok(b.store("1", "+FLAGS", "(\\Deleted)"))
    ok(b.expunge())
    a.untagged_responses.clear()
    ok(a.fetch("2", "(UID)"))  # sequence numbers must not shift under a non-UID FETCH (RFC 3501 §7.4.1)
    assert code_of(a, "EXPUNGE") == []
    ok(a.noop())
    assert code_of(a, "EXPUNGE") == [b"1"]
    assert ok(a.fetch("1", "(UID)")) == [b"1 (UID 2)"]
    a.logout()
    b.logout()


def test_concurrent_appends_get_unique_increasing_uids(imap_server: RunningServer) -> None:
    results: dict[int, list[int]] = {}

    def appender(n: int) -> None:
        conn = imaps(imap_server)
        uids = []
        for i in range(15):
            ok(conn.append("INBOX", None, None, message(f"writer {n} message {i}")))
            uids.append(int(code_of(conn, "APPENDUID")[-1].split()[1]))
        conn.logout()
        results[n] = uids

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    every = [u for uids in results.values() for u in uids]
    assert len(every) == 45 and len(set(every)) == 45  # never repeated
    assert all(uids == sorted(uids) for uids in results.values())  # never backwards for one writer
    conn = imaps(imap_server)
    ok(conn.select("INBOX"))
    assert ok(conn.uid("SEARCH", "ALL"))[0].split() == [b"%d" % u for u in sorted(every)]
    assert code_of(conn, "UIDNEXT") == [b"%d" % (max(every) + 1)]
    conn.logout()


def test_uids_are_not_reused_after_expunging_the_last_message(bob: imaplib.IMAP4_SSL) -> None:
    fill(bob, 2)
    ok(bob.select("INBOX"))
    ok(bob.store("2", "+FLAGS", "(\\Deleted)"))
    ok(bob.expunge())
    fill(bob, 1)
    assert code_of(bob, "APPENDUID")[-1].split()[1] == b"3"
    assert ok(bob.uid("SEARCH", "ALL")) == [b"1 3"]
