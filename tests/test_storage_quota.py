"""Storage quotas end to end: the CLI sets them, SMTP (RCPT and end of DATA) and IMAP (APPEND, COPY) enforce
them, GETQUOTAROOT reports them; and RENAME INBOX. Real smtplib and imaplib against the in-process server."""

from __future__ import annotations

import imaplib
import logging
import re
import smtplib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwarden.server import open_store
from mailwarden.storage.quota import MAX_SIZE, SizeError, format_size, parse_size
from mailwarden.storage.sql import SqlStore
from tests.conftest import ALICE, ALICE_PW, BOB, TlsMaterial, make_instance, run_cli
from tests.test_imap_server import IMAP_LISTENERS, deliver, imaps, message, ok

# ---- sizes an admin types -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("1500", 1500), ("500M", 500 << 20), ("2G", 2 << 30), ("2g", 2 << 30), ("1GiB", 1 << 30),
     ("64K", 65536), ("3 T", 3 << 40), (" 10MB ", 10 << 20), ("7B", 7)],
)  # fmt: skip
def test_parse_size_accepts_what_admins_write(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "G", "2X", "1 2", "0x10", "9" * 40, "99999999999T"])
def test_parse_size_refuses_anything_else_with_a_clear_error(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.text(max_size=80))
def test_parse_size_never_crashes(text: str) -> None:
    try:
        assert 0 <= parse_size(text) <= MAX_SIZE
    except SizeError:
        pass


# ---- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_sets_and_shows_user_and_domain_quotas(tmp_path: Path, tls: TlsMaterial) -> None:
    root = str(make_instance(tmp_path / "i", tls).root)
    code, out, err = run_cli("--dir", root, "user", "quota", BOB)
    assert code == 0, err
    assert out == f"{BOB}: quota 1G (from default), used 0 bytes\n"
    assert run_cli("--dir", root, "domain", "quota", "example.test", "2G")[1] == (
        "example.test: 2G for accounts without their own\n"
    )
    code, out, err = run_cli("--dir", root, "user", "quota", BOB, "500M")
    assert (code, out) == (0, f"{BOB}: quota 500M (from user), used 0 bytes\n"), err
    assert run_cli("--dir", root, "user", "list")[1].split() == [ALICE, BOB]  # unchanged for scripts
    assert run_cli("--dir", root, "user", "list", "--quota")[1].splitlines() == [
        "ADDRESS\tUSED\tQUOTA\tFROM",
        f"{ALICE}\t0\t2G\tdomain",
        f"{BOB}\t0\t500M\tuser",
    ]
    show = run_cli("--dir", root, "user", "show", BOB)[1]
    assert "storage used: 0 bytes, 0 B (0.0%)" in show and "storage quota: 500M (from user)" in show
    assert run_cli("--dir", root, "user", "quota", ALICE, "0")[1].startswith(f"{ALICE}: quota unlimited (from user)")
    assert run_cli("--dir", root, "user", "quota", BOB, "default")[1].startswith(f"{BOB}: quota 2G (from domain)")
    assert run_cli("--dir", root, "domain", "quota", "example.test", "default")[1].startswith(
        "example.test: accounts.default_quota (1G)"
    )
    code, _, err = run_cli("--dir", root, "user", "quota", BOB, "lots")
    assert code == 1 and "not a size: 'lots'" in err
    code, _, err = run_cli("--dir", root, "user", "quota", "nobody@example.test", "1G")
    assert code == 1 and "no such user" in err
    code, _, err = run_cli("--dir", root, "domain", "quota", "elsewhere.test", "1G")
    assert code == 1 and "not a hosted domain" in err


def test_default_quota_config_is_validated(tmp_path: Path, tls: TlsMaterial) -> None:
    root = make_instance(tmp_path / "i", tls).root
    cfg = root / "mailwarden.toml"
    cfg.write_text(cfg.read_text().replace('default_quota = "1G"', 'default_quota = "1,5G"'))
    code, _, err = run_cli("--dir", str(root), "config", "check")
    assert code == 1 and "accounts.default_quota" in err and "not a size" in err


# ---- SMTP ----------------------------------------------------------------------------------------------------------


def mx(server: Any) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30)
    c.ehlo("client.remote.test")
    c.starttls(context=server.tls.client_context())
    c.ehlo("client.remote.test")
    return c


def used(server: Any, address: str = BOB) -> int:
    server.wait_filed()
    return server.call(server.server.store.quota_states([address]))[address].used


def set_quota(server: Any, address: str, size: int | str) -> None:
    code, _, err = server.cli("user", "quota", address, str(size))
    assert code == 0, err


@pytest.fixture
def quota_server(server_factory: Any) -> Any:
    return server_factory(IMAP_LISTENERS)


def test_rcpt_gets_452_4_2_2_at_the_threshold_and_with_a_declared_size(
    quota_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    deliver(quota_server, "first")
    have = used(quota_server)
    assert have > 0
    set_quota(quota_server, BOB, have)  # exactly at the quota: full
    with mx(quota_server) as c:
        c.mail("sender@remote.test")
        code, text = c.rcpt(BOB)
        assert code == 452 and text.startswith(b"4.2.2 Mailbox full: <bob@example.test> is over its storage quota")
        assert c.rcpt(ALICE)[0] == 250  # alice is not affected
    set_quota(quota_server, BOB, have + 1000)  # one byte free is enough to get past RCPT...
    with mx(quota_server) as c:
        c.mail("sender@remote.test")
        assert c.rcpt(BOB)[0] == 250
        c.rset()
        c.mail("sender@remote.test", ["SIZE=1001"])  # ...unless the declared size does not fit
        code, text = c.rcpt(BOB)
        assert code == 452 and text == b"4.2.2 Mailbox full: <bob@example.test> has no room for a message of 1001 bytes"
        c.rset()
        c.mail("sender@remote.test", ["SIZE=900"])
        assert c.rcpt(BOB)[0] == 250
    full = [r.getMessage() for r in caplog.records if "event=quota_full" in r.getMessage()]
    assert len(full) == 2 and all(f"user={BOB}" in line and "stage=rcpt" in line for line in full)
    assert "size=1001" in full[1] and f"limit={have + 1000}" in full[1]
    metrics = quota_server.server.metrics.rejected.labels("mx", "quota_full")._value.get()
    assert metrics == 2


def test_end_of_data_gets_452_when_the_real_size_does_not_fit(quota_server: Any) -> None:
    deliver(quota_server, "first")
    have = used(quota_server)
    set_quota(quota_server, BOB, have + 500)
    with mx(quota_server) as c:
        c.mail("sender@remote.test")
        assert c.rcpt(BOB)[0] == 250
        code, text = c.data(message("too big for the rest", "x" * 2000))
    assert code == 452 and text == b"4.2.2 Mailbox full: <bob@example.test> over its storage quota"
    assert [r[3] for r in quota_server.inbox(BOB)] == ["first"]  # nothing was kept
    assert used(quota_server) == have
    deliver(quota_server, "small enough", body="ok")  # a message that fits still gets in
    assert [r[3] for r in quota_server.inbox(BOB)] == ["first", "small enough"]


def test_data_with_one_full_recipient_delivers_to_the_others_and_bounces_for_it(quota_server: Any) -> None:
    set_quota(quota_server, BOB, 100)
    with mx(quota_server) as c:
        c.mail("sender@remote.test")
        assert c.rcpt(ALICE)[0] == 250
        assert c.rcpt(BOB)[0] == 250  # 0 bytes used: room at RCPT, none for the message
        code, _ = c.data(message("for both", "y" * 500, to=f"{ALICE}, {BOB}"))
    assert code == 250
    assert [r[3] for r in quota_server.inbox(ALICE)] == ["for both"]
    assert quota_server.inbox(BOB) == []
    queue = quota_server.call(quota_server.server.store.list_queue())
    dsn = [q for q in queue if q.recipient == "sender@remote.test"]
    assert len(dsn) == 1 and dsn[0].sender == ""  # a DSN, from <>
    body = quota_server.call(quota_server.server.store.read_blob(dsn[0].blob)).decode()
    assert "Status: 5.2.2" in body and f"Final-Recipient: rfc822; {BOB}" in body
    assert "Subject: for both" in body


def test_null_sender_mail_is_never_dropped_for_a_full_mailbox_next_to_others(quota_server: Any) -> None:
    set_quota(quota_server, BOB, 100)
    with mx(quota_server) as c:
        c.mail("<>")
        c.rcpt(ALICE)
        c.rcpt(BOB)
        assert c.data(message("a bounce", "z" * 500, to=ALICE))[0] == 250
    assert [r[3] for r in quota_server.inbox(BOB)] == ["a bounce"]  # over quota rather than lost
    assert used(quota_server) > 100


def test_submission_to_a_full_local_account_gets_452_at_rcpt(quota_server: Any) -> None:
    deliver(quota_server, "fills it")
    set_quota(quota_server, BOB, 1)
    with smtplib.SMTP("127.0.0.1", quota_server.ports["submission"], timeout=30) as c:
        c.starttls(context=quota_server.tls.client_context())
        c.login(ALICE, ALICE_PW)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            c.sendmail(ALICE, [BOB], message("from alice", to=BOB).replace(b"sender@remote.test", ALICE.encode()))
    code, text = refused.value.recipients[BOB]
    assert code == 452 and text == b"4.2.2 Mailbox full: <bob@example.test> is over its storage quota"
    assert [r[3] for r in quota_server.inbox(BOB)] == ["fills it"]


def test_a_local_sender_gets_the_dsn_in_its_inbox(quota_server: Any) -> None:
    set_quota(quota_server, BOB, 100)
    with smtplib.SMTP("127.0.0.1", quota_server.ports["submission"], timeout=30) as c:
        c.starttls(context=quota_server.tls.client_context())
        c.login(ALICE, ALICE_PW)
        c.mail(ALICE)  # no SIZE=: bob passes RCPT, the end of DATA finds him full
        assert c.rcpt(ALICE)[0] == 250 and c.rcpt(BOB)[0] == 250
        body = message("to us both", "q" * 400, to=BOB).replace(b"sender@remote.test", ALICE.encode())
        assert c.data(body)[0] == 250
    subjects = sorted(r[3] for r in quota_server.inbox(ALICE))
    assert subjects == ["Undelivered Mail Returned to Sender", "to us both"]
    assert quota_server.inbox(BOB) == []
    dsn_uid = next(int(r[0]) for r in quota_server.inbox(ALICE) if r[3].startswith("Undelivered"))
    dsn = quota_server.message(ALICE, dsn_uid).decode()
    assert dsn.startswith("Return-Path: <>") and f"<{BOB}>: Mailbox full: over its storage quota" in dsn


# ---- IMAP ----------------------------------------------------------------------------------------------------------


def quota_line(conn: imaplib.IMAP4) -> str:
    typ, data = conn.getquotaroot("INBOX")
    assert typ == "OK", data
    return data[1][0].decode()


def test_getquotaroot_reports_usage_that_follows_delivery_and_expunge(quota_server: Any) -> None:
    bob = imaps(quota_server)
    assert "QUOTA" in bob.capabilities and "QUOTA=RES-STORAGE" in bob.capabilities
    data = ok(bob.getquotaroot("INBOX"))
    assert data[0] == [b'INBOX ""'] and data[1] == [b'"" (STORAGE 0 1048576)']
    deliver(quota_server, "one", body="a" * 3000)
    have = used(quota_server)
    assert quota_line(bob) == f'"" (STORAGE {-(-have // 1024)} 1048576)'
    assert ok(bob.getquota('""')) == [f'"" (STORAGE {-(-have // 1024)} 1048576)'.encode()]
    ok(bob.select("INBOX"))
    ok(bob.store("1", "+FLAGS", "\\Deleted"))
    ok(bob.expunge())
    assert quota_line(bob) == '"" (STORAGE 0 1048576)'
    set_quota(quota_server, BOB, 0)
    assert quota_line(bob) == '"" ()'  # unlimited: no resource
    bob.logout()


def test_append_over_quota_gets_no_overquota_and_stores_nothing(quota_server: Any) -> None:
    bob = imaps(quota_server)
    set_quota(quota_server, BOB, 2000)
    small = message("fits", "s" * 100)
    ok(bob.append("INBOX", "", None, small))
    typ, data = bob.append("INBOX", "", None, message("too big", "b" * 3000))
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]")
    ok(bob.select("INBOX"))
    assert ok(bob.search(None, "ALL")) == [b"1"]
    assert used(quota_server) == len(small)
    bob.logout()


def test_copy_over_quota_is_refused_move_is_not(quota_server: Any) -> None:
    bob = imaps(quota_server)
    one = message("one", "o" * 1500)
    ok(bob.append("INBOX", "", None, one))
    set_quota(quota_server, BOB, 2 * len(one) - 1)
    ok(bob.select("INBOX"))
    typ, data = bob.copy("1", "Archive")
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]")
    assert ok(bob.status("Archive", "(MESSAGES)")) == [b"Archive (MESSAGES 0)"]
    set_quota(quota_server, BOB, len(one) - 1)  # over quota now: moving to Trash must still work
    typ, data = bob._simple_command("MOVE", "1", "Trash")
    assert typ == "OK", data
    assert ok(bob.status("Trash", "(MESSAGES)")) == [b"Trash (MESSAGES 1)"]
    assert used(quota_server) == len(one)
    bob.logout()


# ---- RENAME INBOX --------------------------------------------------------------------------------------------------


def test_rename_inbox_moves_its_messages_and_leaves_it_empty(quota_server: Any) -> None:
    deliver(quota_server, "old one")
    deliver(quota_server, "old two")
    bob = imaps(quota_server)
    ok(bob.select("INBOX"))
    ok(bob.store("2", "+FLAGS", "\\Flagged"))
    typ, data = bob.rename("INBOX", "Old-Inbox")
    assert typ == "OK", data
    assert bob.rename("INBOX", "Sent")[0] == "NO"  # the target exists
    assert ok(bob.status("INBOX", "(MESSAGES)")) == [b"INBOX (MESSAGES 0)"]
    ok(bob.select("Old-Inbox"))
    fetched = ok(bob.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    subjects = [part[1].decode().strip() for part in fetched if isinstance(part, tuple)]
    assert subjects == ["Subject: old one", "Subject: old two"]
    assert b"\\Flagged" in fetched[2][0]
    deliver(quota_server, "new one")  # delivery goes on into the (same, empty) INBOX
    ok(bob.select("INBOX"))
    assert ok(bob.search(None, "ALL")) == [b"1"]
    assert ok(bob.fetch("1", "(UID)"))[0].endswith(b"(UID 3)")  # INBOX never reuses a UID
    assert used(quota_server) > 0 and bob.getquotaroot("INBOX")[0] == "OK"
    bob.logout()


# ---- the usage counter ---------------------------------------------------------------------------------------------


def test_usage_counter_equals_the_stored_sizes_and_recount_repairs_it(quota_server: Any) -> None:
    deliver(quota_server, "a", body="1" * 100)
    deliver(quota_server, "b", body="2" * 5000)
    bob = imaps(quota_server)
    ok(bob.create("Box"))
    ok(bob.select("INBOX"))
    ok(bob.copy("1:2", "Box"))
    ok(bob.store("1", "+FLAGS", "\\Deleted"))
    ok(bob.expunge())
    ok(bob.append("Box", "", None, message("appended")))
    ok(bob.delete("Box"))
    bob.logout()
    store: SqlStore = quota_server.server.store
    stored = sum(m.size for m in quota_server.call(store.list_messages(BOB, "INBOX")))
    assert used(quota_server) == stored > 5000
    code, out, err = quota_server.cli("user", "quota-recount", BOB)
    assert (code, out) == (0, f"{BOB}\t{stored}\n"), err
    # A counter gone wrong (a restore, a bug) is put right by the recount.
    quota_server.call(store._tx(lambda conn: conn.exec_driver_sql("UPDATE accounts SET used_bytes = 7")))
    assert quota_server.cli("user", "quota-recount")[1].splitlines() == [
        f"{ALICE}\t0\t(was 7)",
        f"{BOB}\t{stored}\t(was 7)",
    ]
    assert used(quota_server) == stored


def test_schema_4_database_gets_quota_columns_and_a_recounted_counter(tmp_path: Path, tls: TlsMaterial) -> None:
    import asyncio

    paths = make_instance(tmp_path / "i", tls)
    run_cli("--dir", str(paths.root), "user", "quota", BOB, "5M")

    async def prepare() -> None:
        store = await open_store(paths)
        await store.imap_append(BOB, "INBOX", message("kept"), [], 0.0)

        def downgrade(conn: Any) -> None:
            for sql in (
                "ALTER TABLE accounts DROP COLUMN used_bytes",
                "ALTER TABLE accounts DROP COLUMN quota_bytes",
                "ALTER TABLE domains DROP COLUMN quota_bytes",
                "UPDATE schema_version SET version = 4",
            ):
                conn.exec_driver_sql(sql)

        await store._tx(downgrade)
        await store.close()

    asyncio.run(prepare())
    code, out, err = run_cli("--dir", str(paths.root), "user", "quota", BOB)
    assert code == 0, err
    assert re.fullmatch(rf"{re.escape(BOB)}: quota 1G \(from default\), used {len(message('kept'))} bytes\n", out)
