"""The outbound queue runner, end to end: the real server sends through a real SMTP peer.

The peer is an aiosmtpd server in this process, configured as the relay host
(`delivery.relay_host`) with STARTTLS and a trustme certificate, answering
what each test needs. Time is driven by a clock injected into the server's
runner, never by sleeping: a test moves the clock, wakes the runner and waits
until it is idle.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
import signal
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailwarden.outbound.queue_runner import QueueRunner
from mailwarden.storage.sql import SqlStore
from tests.conftest import (
    ALICE,
    ALICE_PW,
    BOB,
    RunningServer,
    TlsMaterial,
    make_instance,
    spawn_serve,
    wait_until,
)

FRIEND = "friend@remote.test"
NOBODY = "nobody@remote.test"


# ---- the peer -------------------------------------------------------------------


@dataclass
class Attempt:
    """One DATA transfer the peer received."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool
    reply: str = ""


@dataclass
class Peer:
    """A real SMTP server standing in for the relay host; replies are set per test."""

    port: int
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)  # address -> replies, used in order
    data_replies: list[str] = field(default_factory=list)  # replies to DATA, in order; then `data_default`
    data_default: str = "250 2.0.0 Ok: queued"
    hang: bool = False  # hold the DATA reply until `release` is set (a send in progress)
    attempts: list[Attempt] = field(default_factory=list)
    mails: list[str] = field(default_factory=list)  # every MAIL FROM seen
    data_started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        envelope.mail_from = address  # "<>" for the null sender (aiosmtpd needs it non-empty)
        with self.changed:
            self.mails.append("" if address == "<>" else address)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        replies = self.rcpt_replies.get(address)
        reply = replies.pop(0) if replies else "250 2.1.5 Ok"
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        attempt = Attempt(sender, list(envelope.rcpt_tos), envelope.content, session.ssl is not None)
        with self.changed:
            self.attempts.append(attempt)
            self.changed.notify_all()
        if self.hang:
            self.data_started.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 120)
        attempt.reply = self.data_replies.pop(0) if self.data_replies else self.data_default
        return attempt.reply

    def wait_attempts(self, count: int, timeout: float = 30) -> list[Attempt]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.attempts) >= count, timeout), (
                f"expected {count} attempts, got {len(self.attempts)}"
            )
            return list(self.attempts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_peer(tls: TlsMaterial, starttls: bool = True) -> tuple[Peer, Controller]:
    peer = Peer(free_port())
    kwargs: dict[str, Any] = {}
    if starttls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls.cert, tls.key)
        kwargs = {"tls_context": ctx, "require_starttls": True}
    controller = Controller(peer, hostname="127.0.0.1", port=peer.port, **kwargs)
    controller.start()
    return peer, controller


@pytest.fixture
def peer(tls: TlsMaterial) -> Any:
    p, controller = start_peer(tls)
    yield p
    p.release.set()
    controller.stop()


def relay_config(tls: TlsMaterial, peer: Peer, **extra: Any) -> dict[str, Any]:
    return {
        "delivery.relay_host": f"127.0.0.1:{peer.port}",
        "delivery.ca_file": str(tls.cert.parent / "ca.pem"),
        "queue.retry_schedule": [60, 300],
        "queue.delay_warning": 0,
        "queue.paused": False,  # whatever the shared test config says
        **extra,
    }


# ---- the server and its clock ---------------------------------------------------------


class Clock:
    """Real time plus what the test moved it on by (rows are filed with the real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    @property
    def now(self) -> float:
        return time.time() + self.offset

    def __call__(self) -> float:
        return self.now


@dataclass
class Relaying:
    rs: RunningServer
    peer: Peer
    clock: Clock

    @property
    def runner(self) -> QueueRunner:
        runner = self.rs.server.queue_runner
        assert runner is not None
        return runner

    def run_queue(self, advance: float = 0.0) -> None:
        """Move the clock, wake the runner and wait until it has nothing left to do now."""
        self.clock.offset += advance
        self.rs.wait_filed()

        async def settle() -> None:
            self.runner.wake()
            await self.runner.idle()

        self.rs.call(settle())

    def queue(self) -> list[Any]:
        return self.rs.call(self.rs.server.store.list_queue())

    def send(self, rcpts: list[str], subject: str = "hello", sender: str = ALICE) -> str:
        body = (
            f"From: {ALICE}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@example.test>\r\n\r\nHi there.\r\n.dot line\r\n"
        ).encode()
        with smtplib.SMTP("127.0.0.1", self.rs.ports["submission"], timeout=30) as c:
            c.ehlo("laptop")
            c.starttls(context=self.rs.tls.client_context())
            c.ehlo("laptop")
            c.login(ALICE, ALICE_PW)
            c.mail(sender)
            for r in rcpts:
                assert c.rcpt(r)[0] == 250
            code, reply = c.data(body)
        assert code == 250
        return reply.decode().rsplit(" ", 1)[1]

    def dsns(self, address: str = ALICE) -> list[email.message.EmailMessage]:
        rows = self.rs.inbox(address)
        found = []
        for uid, _date, from_, _subject in rows:
            if from_.startswith("Mail Delivery System"):
                raw = self.rs.message(address, int(uid))
                found.append(email.message_from_bytes(raw, policy=email.policy.default))
        return found


@pytest.fixture
def relaying(server_factory: Any, tls: TlsMaterial, peer: Peer) -> Any:
    def make(**overrides: Any) -> Relaying:
        rs = server_factory(relay_config(tls, peer, **overrides))
        clock = Clock()
        rs.server.queue_runner.clock = clock
        return Relaying(rs, peer, clock)

    return make


def status_blocks(dsn: email.message.EmailMessage) -> list[Any]:
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = list(dsn.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    return list(parts[1].get_payload())


def log_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"event={event} ")]


# ---- outcomes -----------------------------------------------------------------------


def test_250_delivers_over_verified_tls_and_removes_the_rows(relaying: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    q = relaying()
    qid = q.send([FRIEND, "other@remote.test", "third@else.test"])
    q.run_queue()
    attempts = q.peer.wait_attempts(2)
    # One transaction per destination domain: remote.test's two recipients together.
    assert sorted(sorted(a.rcpts) for a in attempts) == [
        ["friend@remote.test", "other@remote.test"],
        ["third@else.test"],
    ]
    assert all(a.mail_from == ALICE and a.tls for a in attempts)
    assert b"\r\n.dot line\r\n" in attempts[0].data  # dot-stuffed on the wire, unstuffed by the peer
    assert q.queue() == []
    delivered = log_lines(caplog, "delivered")
    assert len(delivered) == 3
    assert all(f"qid={qid}" in line and 'remote="127.0.0.1 [127.0.0.1]"' in line for line in delivered)
    assert all('tls="TLSv1.3 verified"' in line for line in delivered)
    assert q.rs.cli("queue", "list")[1].count("\n") == 1  # header only
    assert q.runner.counters.delivered == 3


def test_4xx_is_retried_on_the_schedule_then_delivered(relaying: Any) -> None:
    q = relaying()
    q.peer.data_replies = ["451 4.3.0 Try again later"]
    qid = q.send([FRIEND])
    q.run_queue()
    q.peer.wait_attempts(1)
    [row] = q.queue()
    assert (row.status, row.attempts) == ("queued", 1)
    assert "451 4.3.0 Try again later" in row.last_error
    assert 55 <= row.next_attempt - q.clock.now <= 66  # the first delay, up to 10 % jitter
    code, shown, _ = q.rs.cli("queue", "show", qid)
    assert code == 0
    assert f"Recipient: <{FRIEND}> status=queued attempts=1 next_attempt=" in shown
    assert "451 4.3.0 Try again later" in shown

    q.run_queue(advance=30)  # not due yet
    assert len(q.peer.attempts) == 1
    q.run_queue(advance=37)  # 67 s after the first attempt: due
    assert len(q.peer.wait_attempts(2)) == 2
    assert q.peer.attempts[1].reply.startswith("250")
    assert q.queue() == []
    assert q.dsns() == []  # a retry that succeeds tells the sender nothing


def test_second_retry_waits_the_second_delay(relaying: Any) -> None:
    q = relaying(**{"queue.retry_schedule": [60, 300]})
    q.peer.data_default = "452 4.2.2 Mailbox full"
    q.send([FRIEND])
    q.run_queue()
    q.run_queue(advance=70)
    [row] = q.queue()
    assert row.attempts == 2 and 295 <= row.next_attempt - q.clock.now <= 330
    q.run_queue(advance=340)
    q.run_queue(advance=340)  # the last delay repeats
    assert q.queue()[0].attempts == 4


def test_5xx_bounces_with_a_dsn_in_the_senders_inbox(relaying: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    q = relaying()
    q.peer.rcpt_replies[NOBODY] = ["550 5.1.1 <nobody@remote.test>: Recipient address rejected"]
    qid = q.send([NOBODY, FRIEND], subject="quarterly report")
    q.run_queue()
    [attempt] = q.peer.wait_attempts(1)
    assert attempt.rcpts == [FRIEND]  # the other recipient was still delivered
    assert q.queue() == []
    [dsn] = q.dsns()
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@example.test>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert dsn["In-Reply-To"] == "<quarterly-report@example.test>"
    raw = q.rs.message(ALICE, 1)
    assert raw.startswith(b"Return-Path: <>\r\n")  # the DSN's envelope sender is null
    per_message, *per_rcpt = status_blocks(dsn)
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_message["Arrival-Date"]
    assert len(per_rcpt) == 1
    r = per_rcpt[0]
    assert r["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert (r["Action"], r["Status"]) == ("failed", "5.1.1")
    assert r["Remote-MTA"] == "dns; 127.0.0.1"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 <nobody@remote.test>: Recipient address rejected"
    assert r["Last-Attempt-Date"]
    text = " ".join(next(dsn.iter_parts()).get_content().split())
    assert "<nobody@remote.test>: 127.0.0.1 said: 550 5.1.1" in text and "quarterly report" in text
    headers = list(dsn.iter_parts())[2].get_content()
    assert "Subject: quarterly report" in headers and "Hi there." not in headers  # headers only, no body
    [bounced] = log_lines(caplog, "bounced")
    assert f"qid={qid}" in bounced and "rcpt=nobody@remote.test" in bounced and "reason=failed" in bounced


def test_expiry_past_max_lifetime_bounces(relaying: Any) -> None:
    q = relaying(**{"queue.max_lifetime": 3600})
    q.peer.data_default = "421 4.4.2 Service shutting down"
    q.send([FRIEND], subject="too late")
    q.run_queue()
    assert q.queue()[0].attempts == 1 and q.dsns() == []
    q.run_queue(advance=4000)
    assert len(q.peer.wait_attempts(2)) == 2  # tried once more, then given up
    assert q.queue() == []
    [dsn] = q.dsns()
    [_, r] = status_blocks(dsn)
    assert (r["Action"], r["Status"]) == ("failed", "4.4.2")  # expired: the last (temporary) status
    assert r["Diagnostic-Code"] == "smtp; 421 4.4.2 Service shutting down"
    assert "gave up" in " ".join(next(dsn.iter_parts()).get_content().split())


def test_delay_warning_is_sent_once_per_recipient(relaying: Any) -> None:
    q = relaying(**{"queue.delay_warning": 600, "queue.retry_schedule": [60], "queue.max_lifetime": 86400})
    q.peer.data_default = "451 4.7.1 Greylisted"
    q.send([FRIEND], subject="patience")
    q.run_queue()
    assert q.dsns() == []
    q.run_queue(advance=700)  # second attempt, 700 s after arrival: warn
    [warning] = q.dsns()
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    [_, r] = status_blocks(warning)
    assert (r["Action"], r["Status"]) == ("delayed", "4.7.1")
    assert r["Will-Retry-Until"]
    assert "You do not need to send it again" in " ".join(next(warning.iter_parts()).get_content().split())
    q.run_queue(advance=100)
    q.run_queue(advance=100)
    assert len(q.peer.attempts) == 4
    assert len(q.dsns()) == 1  # still just the one warning
    [row] = q.queue()
    assert row.warned and row.attempts == 4


def test_a_failing_message_from_the_null_sender_gets_no_dsn(relaying: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    q = relaying()
    assert q.rs.cli("alias", "add", "fwd@example.test", NOBODY)[0] == 0
    q.peer.rcpt_replies[NOBODY] = ["550 5.1.1 No such user"]
    with smtplib.SMTP("127.0.0.1", q.rs.ports["mx"], timeout=30) as c:
        c.ehlo("bounce.remote.test")
        c.mail("<>")
        c.rcpt("fwd@example.test")
        assert c.data(b"From: MAILER-DAEMON@remote.test\r\nSubject: a bounce\r\n\r\nx\r\n")[0] == 250
    q.run_queue()
    assert q.peer.mails == [""]  # forwarded with the null sender kept
    assert q.queue() == []  # given up on ...
    assert q.dsns(ALICE) == [] and q.dsns(BOB) == []  # ... and nobody is told
    assert len(log_lines(caplog, "dsn_suppressed")) == 1
    q.run_queue(advance=1000)
    assert q.peer.mails == [""]  # and nothing was queued to send later


def test_a_dsn_to_a_remote_sender_is_queued_with_the_null_sender(relaying: Any) -> None:
    q = relaying()
    assert q.rs.cli("alias", "add", "fwd@example.test", NOBODY)[0] == 0
    q.peer.rcpt_replies[NOBODY] = ["550 5.1.1 No such user"]
    with smtplib.SMTP("127.0.0.1", q.rs.ports["mx"], timeout=30) as c:
        c.ehlo("origin.test")
        c.sendmail("writer@origin.test", ["fwd@example.test"], b"From: writer@origin.test\r\nSubject: hi\r\n\r\nx\r\n")
    q.run_queue()  # the forward bounces; its DSN is queued and sent in the same run
    attempts = q.peer.wait_attempts(1)
    assert [(a.mail_from, a.rcpts) for a in attempts] == [("", ["writer@origin.test"])]
    dsn = email.message_from_bytes(attempts[0].data, policy=email.policy.default)
    [_, r] = status_blocks(dsn)
    assert (r["Final-Recipient"], r["Status"]) == ("rfc822; nobody@remote.test", "5.1.1")
    assert q.queue() == []


# ---- TLS to the relay ---------------------------------------------------------------------


def test_a_relay_without_starttls_is_never_sent_to_in_clear(server_factory: Any, tls: TlsMaterial) -> None:
    plain, controller = start_peer(tls, starttls=False)
    try:
        rs = server_factory(relay_config(tls, plain))
        q = Relaying(rs, plain, Clock())
        rs.server.queue_runner.clock = q.clock
        q.send([FRIEND])
        q.run_queue()
        assert plain.mails == [] and plain.attempts == []
        [row] = q.queue()
        assert row.status == "queued" and "4.7.4" in row.last_error and "STARTTLS" in row.last_error
    finally:
        controller.stop()


def test_a_relay_certificate_that_does_not_verify_defers(server_factory: Any, tls: TlsMaterial, peer: Peer) -> None:
    config = relay_config(tls, peer)
    del config["delivery.ca_file"]  # the system CAs do not know the test CA
    rs = server_factory(config)
    q = Relaying(rs, peer, Clock())
    rs.server.queue_runner.clock = q.clock
    q.send([FRIEND])
    q.run_queue()
    assert peer.mails == []
    [row] = q.queue()
    assert row.status == "queued" and "4.7.5" in row.last_error and "CERTIFICATE_VERIFY_FAILED" in row.last_error


# ---- the CLI ------------------------------------------------------------------------


def test_hold_and_release_from_the_cli(relaying: Any) -> None:
    q = relaying()
    q.peer.data_replies = ["451 4.3.0 later"]
    qid = q.send([FRIEND])
    q.run_queue()
    code, out, _ = q.rs.cli("queue", "hold", qid)
    assert code == 0 and f"held {qid} (1 recipient)" in out
    assert q.rs.cli("queue", "list")[1].splitlines()[1].split("\t")[2] == "held"
    q.run_queue(advance=10_000)  # long past due: held mail is not sent
    assert len(q.peer.attempts) == 1
    code, _, err = q.rs.cli("queue", "release", "NOSUCH")
    assert code == 1 and "no held message" in err
    code, out, _ = q.rs.cli("queue", "release", qid)
    assert code == 0 and f"released {qid}" in out
    q.run_queue()
    assert len(q.peer.wait_attempts(2)) == 2
    assert q.queue() == []


def test_flush_wakes_the_running_server(server_factory: Any, tls: TlsMaterial, peer: Peer) -> None:
    rs = server_factory(relay_config(tls, peer, **{"queue.retry_schedule": [3600]}))
    q = Relaying(rs, peer, Clock())  # the real clock: the runner wakes through the CLI's wake file
    rs.server.queue_runner.clock = time.time
    peer.data_replies = ["451 4.3.0 later"]
    q.send([FRIEND])
    peer.wait_attempts(1)
    wait_until(lambda: q.queue() and q.queue()[0].attempts == 1, 30, "the deferral to be recorded")
    code, out, _ = rs.cli("queue", "flush")
    assert code == 0 and "1 queued recipient due now" in out
    peer.wait_attempts(2, timeout=10)  # an hour early, because of the flush
    wait_until(lambda: not q.queue(), 30, "the queue to empty")


# ---- storage --------------------------------------------------------------------------


async def test_two_runners_never_claim_the_same_row(tmp_path: Path) -> None:
    from mailwarden.storage.interfaces import DeliveryBatch, RemoteDelivery

    store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
    try:
        batch = DeliveryBatch(remote=[(RemoteDelivery(f"Q{i}", ALICE, FRIEND), b"x\r\n") for i in range(10)])
        await store.deliver(batch)
        now = time.time()
        first, second = await asyncio.gather(
            store.claim_due(now, 6, now + 60, owner=0), store.claim_due(now, 6, now + 60, owner=1)
        )
        ids = [r.id for r in first] + [r.id for r in second]
        assert len(ids) == 10 and len(set(ids)) == 10
        assert await store.claim_due(now, 10, now + 60, owner=2) == []
        assert await store.requeue_sending(owner=1) == len(second)  # a restarted worker 1 takes back its own
        assert await store.requeue_sending(lapsed_before=now + 61) == len(first)  # lapsed leases
        assert len(await store.claim_due(now, 10, now + 60, owner=2)) == 10
    finally:
        await store.close()


async def test_a_database_from_before_the_runner_gets_its_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE queue (id INTEGER PRIMARY KEY, queue_id VARCHAR(32) NOT NULL, sender VARCHAR(320) NOT NULL,
            recipient VARCHAR(320) NOT NULL, status VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL,
            created FLOAT NOT NULL, next_attempt FLOAT NOT NULL, last_error TEXT NOT NULL, size INTEGER NOT NULL,
            blob TEXT NOT NULL, UNIQUE (queue_id, recipient));
        INSERT INTO queue VALUES (1, 'OLD1', 'a@example.test', 'b@remote.test', 'queued', 2, 1.0, 2.0, 'x', 3,
            'db:queue/OLD1.eml');
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (2);
        """
    )
    con.commit()
    con.close()
    store = await SqlStore.open_sqlite(db, tmp_path / "blobs")
    try:
        [row] = await store.list_queue()
        assert (row.queue_id, row.attempts, row.lease_until, row.warned) == ("OLD1", 2, 0.0, False)
        [claimed] = await store.claim_due(10.0, 5, 70.0, owner=0)
        assert (claimed.status, claimed.lease_until) == ("sending", 70.0)
    finally:
        await store.close()
    store = await SqlStore.open_sqlite(db, tmp_path / "blobs")  # a second open changes nothing
    await store.close()
    names = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(queue)")}
    assert {"lease_until", "lease_owner", "warned"} <= names


# ---- crash and restart ------------------------------------------------------------------


def test_kill_9_mid_send_delivers_after_restart_exactly_once_more(tmp_path: Path, tls: TlsMaterial, peer: Peer) -> None:
    root = tmp_path / "instance"
    make_instance(root, tls, {**relay_config(tls, peer), "listen.metrics": "", "server.workers": 1})
    peer.hang = True
    serve = spawn_serve(root)
    with smtplib.SMTP("127.0.0.1", serve.ports["submission"], timeout=30) as c:
        c.starttls(context=tls.client_context())
        c.login(ALICE, ALICE_PW)
        c.sendmail(ALICE, [FRIEND], f"From: {ALICE}\r\nSubject: crash\r\n\r\nbody\r\n".encode())
    assert peer.data_started.wait(30), "the send never reached DATA"
    db = f"file:{root / 'data' / 'mailwarden.db'}?mode=ro"
    con = sqlite3.connect(db, uri=True)
    assert con.execute("SELECT status, attempts FROM queue").fetchall() == [("sending", 0)]  # claimed
    con.close()
    os.killpg(serve.proc.pid, signal.SIGKILL)  # mid-send: the peer has the data, we never got its reply
    serve.proc.wait(30)

    peer.hang = False
    mark = len(peer.attempts)
    serve = spawn_serve(root)
    try:
        serve.wait_for(("event=queue_requeued",))  # at start, before any runner: the cut-off send goes back
        [line] = serve.wait_for(("event=delivered",))
        assert "rcpt=friend@remote.test" in line
    finally:
        assert serve.stop() == 0
    attempts = peer.attempts
    assert len(attempts) == mark + 1 == 2  # the cut-off send, and exactly one more
    assert attempts[0].data == attempts[1].data
    con = sqlite3.connect(db, uri=True)
    assert con.execute("SELECT COUNT(*) FROM queue").fetchone() == (0,)  # recorded: nothing left to send again
    con.close()


def test_two_workers_send_each_message_once(tmp_path: Path, tls: TlsMaterial, peer: Peer) -> None:
    root = tmp_path / "instance"
    make_instance(root, tls, {**relay_config(tls, peer), "listen.metrics": "", "server.workers": 2})
    serve = spawn_serve(root)
    try:
        assert serve.wait_for(("event=queue_runner_started",), count=2)
        with smtplib.SMTP("127.0.0.1", serve.ports["submission"], timeout=30) as c:
            c.starttls(context=tls.client_context())
            c.login(ALICE, ALICE_PW)
            for i in range(12):
                c.sendmail(ALICE, [f"r{i}@remote.test"], f"From: {ALICE}\r\nSubject: n{i}\r\n\r\nx\r\n".encode())
        serve.wait_for(("event=delivered",), count=12)
    finally:
        assert serve.stop() == 0
    rcpts = sorted(r for a in peer.attempts for r in a.rcpts)
    assert rcpts == sorted(f"r{i}@remote.test" for i in range(12))  # each once, whichever worker sent it
