"""What an operator sees: the Prometheus endpoint and the key=value log."""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import threading
import urllib.request
from dataclasses import dataclass
from typing import Protocol

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ALICE, ALICE_PW, BOB, RunningServer, TlsMaterial, make_instance, run_cli, spawn_serve

WRONG_PW = "hunter2 is not the password"


def msg(subject: str = "hello") -> bytes:
    return f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nHi Bob.\r\n".encode()


class Target(Protocol):
    """What the helpers need: the in-process server, or a `serve` subprocess."""

    ports: dict[str, int]
    tls: TlsMaterial


@dataclass
class Process:
    ports: dict[str, int]
    tls: TlsMaterial


def submission(server: Target) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
    c.ehlo("laptop")
    c.starttls(context=server.tls.client_context())
    c.ehlo("laptop")
    return c


def scrape(server: Target) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on /metrics, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=30) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def send_one(server: Target, subject: str = "hello") -> None:
    with submission(server) as c:
        c.login(ALICE, ALICE_PW)
        assert c.sendmail(ALICE, [BOB], msg(subject)) == {}


def failed_auth(server: Target, mechanism: str = "PLAIN") -> None:
    with submission(server) as c:
        c.user, c.password = ALICE, WRONG_PW
        auth = c.auth_plain if mechanism == "PLAIN" else c.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            c.auth(mechanism, auth)
        assert err.value.smtp_code == 535


def relay_attempt(server: Target) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("client.remote.test")
        c.mail("sender@remote.test")
        code, _ = c.rcpt("victim@elsewhere.test")
        assert code == 554


def test_metrics_count_what_happened(server: RunningServer) -> None:
    send_one(server)
    relay_attempt(server)
    failed_auth(server)
    server.wait_filed()
    m = scrape(server)
    assert (value(m, "mailwarden_smtp_connections_total", listener="mx") or 0) >= 1
    assert (value(m, "mailwarden_smtp_connections_total", listener="submission") or 0) >= 2
    assert value(m, "mailwarden_messages_accepted_total", listener="submission") == 1
    assert total(m, "mailwarden_messages_accepted_total") == 1
    assert value(m, "mailwarden_messages_rejected_total", listener="mx", reason="relay_denied") == 1
    assert value(m, "mailwarden_messages_rejected_total", listener="submission", reason="auth_failed") == 1
    assert value(m, "mailwarden_queue_size") is not None
    assert value(m, "mailwarden_spool_outstanding") is not None
    assert (value(m, "mailwarden_fsync_batch_size_count") or 0) >= 1
    # Every accepted message was made durable by exactly one fsync batch.
    assert value(m, "mailwarden_fsync_batch_size_sum") == 1


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, tls: TlsMaterial) -> Samples:
    """/metrics of a two-worker `serve` after 3 messages, a relay attempt and a failed AUTH, all filed."""
    root = tmp_path_factory.mktemp("metrics-workers") / "instance"
    make_instance(root, tls, {"server.workers": 2})
    serve = spawn_serve(root)
    try:
        target = Process(serve.ports, tls)
        for i in range(3):  # new connections land on either worker
            send_one(target, f"message {i}")
        relay_attempt(target)
        failed_auth(target)
        # Filing, and the gauges with it, runs after the 250: wait for the three filed log lines.
        serve.wait_for(("event=filed",), count=3)
        code, out, err = run_cli("--dir", str(root), "mailbox", "ls", BOB)
        assert code == 0 and len(out.splitlines()) == 4, (out, err)
        m = scrape(target)
    finally:
        assert serve.stop() == 0
        assert serve.proc.stdout is not None
        serve.proc.stdout.close()
    return m


def test_counters_add_up_across_worker_processes(two_workers: Samples) -> None:
    m = two_workers
    assert (value(m, "mailwarden_smtp_connections_total", listener="submission") or 0) >= 4
    assert (value(m, "mailwarden_smtp_connections_total", listener="mx") or 0) >= 1
    assert value(m, "mailwarden_messages_accepted_total", listener="submission") == 3
    assert value(m, "mailwarden_messages_rejected_total", listener="mx", reason="relay_denied") == 1
    assert value(m, "mailwarden_messages_rejected_total", listener="submission", reason="auth_failed") == 1
    assert value(m, "mailwarden_fsync_batch_size_sum") == 3
    assert 1 <= (value(m, "mailwarden_fsync_batch_size_count") or 0) <= 3


def test_gauges_are_one_series_across_worker_processes(two_workers: Samples) -> None:
    # An operator's `mailwarden_queue_size` is the server's queue, as with one process.
    assert value(two_workers, "mailwarden_queue_size") == 0
    assert value(two_workers, "mailwarden_spool_outstanding") == 0


def test_group_commit_never_costs_more_than_one_fsync_per_message(server: RunningServer) -> None:
    n = 20
    before = scrape(server)
    fsyncs_before = value(before, "mailwarden_fsync_batch_size_count") or 0
    durable_before = value(before, "mailwarden_fsync_batch_size_sum") or 0
    clients = []
    for _ in range(n):  # log in first so the sends overlap
        c = submission(server)
        c.login(ALICE, ALICE_PW)
        clients.append(c)
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            barrier.wait(30)
            assert clients[i].sendmail(ALICE, [BOB], msg(f"concurrent {i}")) == {}
            clients[i].quit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(server.inbox(BOB)) == n
    after = scrape(server)
    fsyncs = (value(after, "mailwarden_fsync_batch_size_count") or 0) - fsyncs_before
    durable = (value(after, "mailwarden_fsync_batch_size_sum") or 0) - durable_before
    assert durable == n  # each message is counted in exactly one batch
    assert 1 <= fsyncs <= n
    assert total(after, "mailwarden_messages_accepted_total") == n


# ---- logs ------------------------------------------------------------------------

_KV = re.compile(r'[a-z_]+=(?:"(?:[^"\\]|\\.)*"|[^\s"=]+)')


def test_logs_are_key_value_and_never_contain_passwords(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailwarden")  # even at debug level, operators may turn it on
    failed_auth(server, "PLAIN")
    failed_auth(server, "LOGIN")
    send_one(server)  # a successful AUTH PLAIN
    with submission(server) as c:  # and a successful AUTH LOGIN
        c.user, c.password = ALICE, ALICE_PW
        assert c.auth("LOGIN", c.auth_login)[0] == 235
    server.wait_filed()

    records = [r for r in caplog.records if r.name == "mailwarden" or r.name.startswith("mailwarden.")]
    lines = [r.getMessage() for r in records]
    assert lines, "nothing was logged"
    secrets = [ALICE_PW, WRONG_PW]
    secrets += [base64.b64encode(p.encode()).decode() for p in secrets]
    secrets += [base64.b64encode(f"\0{ALICE}\0{p}".encode()).decode() for p in (ALICE_PW, WRONG_PW)]
    for line in lines:
        for secret in secrets:
            assert secret not in line, line
    for r in records:
        if r.name == "mailwarden":
            line = r.getMessage()
            assert _KV.sub("", line).strip() == "", f"not key=value: {line!r}"
            assert line.startswith("event=")
    fails = [line for line in lines if line.startswith("event=auth_fail ")]
    assert len(fails) == 2 and all(f"user={ALICE}" in line and "ip=127.0.0.1" in line for line in fails), fails
    oks = [line for line in lines if line.startswith("event=auth_ok ")]
    assert len(oks) == 2 and all(f"user={ALICE}" in line for line in oks), oks
