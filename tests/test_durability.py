"""A 250 means the message survives kill -9, and is filed exactly once."""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import BOB, TlsMaterial, make_instance, spawn_serve

CLIENTS = 8
KILL_AFTER = 150  # acknowledged messages before the kill


def _sender(port: int, worker: int, acked: dict[str, str], lock: threading.Lock, enough: threading.Event) -> None:
    i = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("load.test")
            while True:
                i += 1
                subject = f"load-{worker}-{i}"
                body = f"From: load@remote.test\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\n{'x' * 2000}\r\n"
                c.mail("load@remote.test")
                c.rcpt(BOB)
                code, reply = c.data(body.encode())
                if code == 250:
                    qid = reply.decode().rsplit(" ", 1)[1]
                    with lock:
                        acked[qid] = subject
                        if len(acked) >= KILL_AFTER:
                            enough.set()
                if i % 50 == 0:  # the session message limit is 100
                    c.rset()
                    c.quit()
                    c.connect("127.0.0.1", port)
                    c.ehlo("load.test")
    except (smtplib.SMTPException, OSError):
        return  # the server was killed under us


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_kill_9_during_load_loses_and_duplicates_nothing(tmp_path: Path, tls: TlsMaterial, workers: int) -> None:
    root = tmp_path / "instance"
    make_instance(root, tls, {"listen.mx": "127.0.0.1:0", "listen.metrics": "", "server.workers": workers})
    serve = spawn_serve(root)
    acked: dict[str, str] = {}
    lock = threading.Lock()
    enough = threading.Event()
    threads = [
        threading.Thread(target=_sender, args=(serve.ports["mx"], w, acked, lock, enough), daemon=True)
        for w in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    assert enough.wait(120), "load did not reach the kill point"
    os.killpg(serve.proc.pid, signal.SIGKILL)  # the supervisor and every worker, at once
    serve.proc.wait(30)
    for t in threads:
        t.join(60)
    with lock:
        acknowledged = dict(acked)
    assert len(acknowledged) >= KILL_AFTER

    # Restart: recovery files the spool before the listeners open.
    serve = spawn_serve(root)
    try:
        db = sqlite3.connect(f"file:{root / 'data' / 'mailwarden.db'}?mode=ro", uri=True)
        filed = Counter(qid for (qid,) in db.execute("SELECT queue_id FROM messages"))
        bodies = dict(db.execute("SELECT m.queue_id, b.data FROM messages m JOIN blob_data b ON b.name = m.blob"))
        db.close()
    finally:
        assert serve.stop() == 0
    missing = [qid for qid in acknowledged if filed[qid] != 1]
    assert missing == [], f"{len(missing)} acknowledged messages not filed exactly once"
    assert [qid for qid, n in filed.items() if n > 1] == []
    # And each filed message is the one that was acknowledged.
    for qid in list(acknowledged)[:: max(1, len(acknowledged) // 20)]:
        data = bodies[qid]  # small bodies are rows, written in the filing transaction
        assert f"Subject: {acknowledged[qid]}\r\n".encode() in data
