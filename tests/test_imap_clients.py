"""Real IMAP clients from Debian against the real server: mbsync (isync) two-way sync and fetchmail.

Both run as subprocesses over implicit TLS, verifying the server's certificate against the test CA; the
server side is checked with imaplib, the client side by reading the files the client wrote.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BOB, BOB_PW, RunningServer, TlsMaterial, make_instance, start_server, stop_server
from tests.test_imap_server import IMAP_LISTENERS, deliver, imaps, message, ok


@pytest.fixture
def imap_server(server_factory: Any) -> RunningServer:
    return server_factory(IMAP_LISTENERS)


def ca_pem(server: RunningServer) -> Path:
    return server.tls.cert.parent / "ca.pem"


# ---- server-side view -----------------------------------------------------------------------------------------------


def server_view(server: RunningServer) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Every folder's messages as a client sees them: (Subject, sorted flags), in UID order."""
    conn = imaps(server)
    view: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    try:
        for line in ok(conn.list('""', "*")):
            if b"\\Noselect" in line:
                continue
            name = line.decode().rsplit(' "/" ', 1)[1].strip('"')
            ok(conn.select(f'"{name}"', readonly=True))
            rows: list[tuple[str, tuple[str, ...]]] = []
            data = ok(conn.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
            for item in data:
                if not isinstance(item, tuple):
                    continue
                flags = imaplib.ParseFlags(item[0])
                subject = item[1].decode().partition(":")[2].strip()
                rows.append((subject, tuple(sorted(f.decode() for f in flags))))
            view[name] = rows
    finally:
        conn.logout()
    return view


# ---- mbsync ----------------------------------------------------------------------------------------------------------


class Mbsync:
    """One mbsync setup: an IMAPStore on the server's 993-role listener, a MaildirStore in tmp_path."""

    def __init__(self, server: RunningServer, root: Path) -> None:
        self.maildir = root / "mail"
        self.maildir.mkdir()
        self.rc = root / "mbsyncrc"
        # Host is "localhost": isync checks DNS names in the certificate, not IP addresses.
        self.rc.write_text(
            f"IMAPAccount mailwarden\nHost localhost\nPort {server.ports['imaps']}\nUser {BOB}\n"
            f'Pass "{BOB_PW}"\nSSLType IMAPS\nCertificateFile {ca_pem(server)}\n\n'
            "IMAPStore remote\nAccount mailwarden\n\n"
            f"MaildirStore local\nPath {self.maildir}/\nInbox {self.maildir}/INBOX\nSubFolders Verbatim\n\n"
            "Channel sync\nFar :remote:\nNear :local:\nPatterns *\nSync All\nCreate Both\nRemove None\n"
            "Expunge Both\nSyncState *\n"
        )

    def sync(self) -> str:
        out = subprocess.run(["mbsync", "-V", "-c", str(self.rc), "-a"], capture_output=True, text=True, timeout=120)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log
        assert "Error" not in log and "Warning" not in log, log
        return log

    def folder(self, name: str) -> Path:
        return self.maildir / name

    def files(self, name: str) -> list[Path]:
        box = self.folder(name)
        return sorted(p for sub in ("new", "cur") for p in (box / sub).iterdir())

    def view(self, name: str) -> list[tuple[str, str]]:
        """(Subject, maildir flags) of every local message in a folder, sorted by subject."""
        rows = []
        for p in self.files(name):
            subject = next(
                (line[9:] for line in p.read_bytes().decode().splitlines() if line.startswith("Subject: ")), ""
            )
            rows.append((subject, p.name.partition(":2,")[2]))
        return sorted(rows)

    def file_of(self, name: str, subject: str) -> Path:
        for p in self.files(name):
            if f"Subject: {subject}\r\n".encode() in p.read_bytes() or f"Subject: {subject}\n".encode() in (
                p.read_bytes()
            ):
                return p
        raise AssertionError(f"no local message {subject!r} in {name}")

    def add(self, name: str, subject: str) -> None:
        box = self.folder(name)
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        fresh = box / "new" / f"{int(time.time())}.{os.getpid()}_{subject.replace(' ', '_')}.testhost"
        fresh.write_bytes(message(subject, to=BOB))

    def snapshot(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.maildir)): p.read_bytes()
            for p in sorted(self.maildir.rglob("*"))
            if p.is_file() and p.parent.name in ("new", "cur")
        }


@pytest.fixture
def mbsync(imap_server: RunningServer, tmp_path: Path) -> Mbsync:
    if shutil.which("mbsync") is None:
        pytest.skip("mbsync (isync) is not installed")
    return Mbsync(imap_server, tmp_path)


def test_mbsync_pulls_delivered_mail_into_the_maildir(imap_server: RunningServer, mbsync: Mbsync) -> None:
    deliver(imap_server, "one")
    deliver(imap_server, "two", body="Second body.")
    mbsync.sync()
    assert mbsync.view("INBOX") == [("one", ""), ("two", "")]
    assert {"Sent", "Drafts", "Junk", "Trash", "Archive"} <= {p.name for p in mbsync.maildir.iterdir()}
    local = mbsync.file_of("INBOX", "two").read_bytes()
    conn = imaps(imap_server)
    ok(conn.select("INBOX"))
    remote = ok(conn.fetch("2", "(BODY.PEEK[])"))[0][1]
    conn.logout()
    # byte for byte, but for LF line ends in the Maildir and mbsync's own X-TUID header (its crash-recovery tag)
    local = b"".join(line for line in local.splitlines(keepends=True) if not line.startswith(b"X-TUID: "))
    assert local == remote.replace(b"\r\n", b"\n")


def test_mbsync_pushes_local_changes_up(imap_server: RunningServer, mbsync: Mbsync) -> None:
    for subject in ("keep", "flag me", "delete me"):
        deliver(imap_server, subject)
    mbsync.sync()
    flag = mbsync.file_of("INBOX", "flag me")
    flag.rename(flag.parent.parent / "cur" / (flag.name.partition(":2,")[0] + ":2,FS"))
    mbsync.file_of("INBOX", "delete me").unlink()
    mbsync.add("INBOX", "written offline")
    mbsync.add("Local Folder", "in a local folder")
    mbsync.sync()
    view = server_view(imap_server)
    assert view["INBOX"] == [("keep", ()), ("flag me", ("\\Flagged", "\\Seen")), ("written offline", ())]
    assert view["Local Folder"] == [("in a local folder", ())]


def test_mbsync_pulls_server_changes_down(imap_server: RunningServer, mbsync: Mbsync) -> None:
    for subject in ("stays", "gets flagged", "gets expunged"):
        deliver(imap_server, subject)
    mbsync.sync()
    deliver(imap_server, "arrives later")
    conn = imaps(imap_server)
    ok(conn.select("INBOX"))
    ok(conn.store("2", "+FLAGS", "(\\Flagged \\Answered)"))
    ok(conn.store("3", "+FLAGS", "(\\Deleted)"))
    ok(conn.expunge())
    ok(conn.create('"Server Folder"'))
    ok(conn.append('"Server Folder"', "(\\Seen)", None, message("made on the server")))
    conn.logout()
    mbsync.sync()
    assert mbsync.view("INBOX") == [("arrives later", ""), ("gets flagged", "FR"), ("stays", "")]
    assert mbsync.view("Server Folder") == [("made on the server", "S")]


def test_mbsync_second_sync_without_changes_is_a_no_op(imap_server: RunningServer, mbsync: Mbsync) -> None:
    deliver(imap_server, "settled")
    mbsync.add("INBOX", "local one")
    mbsync.add("Projects", "local project")
    mbsync.sync()
    local, remote = mbsync.snapshot(), server_view(imap_server)
    uidnext = {name: status_uidnext(imap_server, name) for name in remote}
    log = mbsync.sync()
    assert mbsync.snapshot() == local
    assert server_view(imap_server) == remote
    assert {name: status_uidnext(imap_server, name) for name in remote} == uidnext  # nothing appended
    assert "Creating" not in log


def status_uidnext(server: RunningServer, name: str) -> int:
    conn = imaps(server)
    try:
        line = ok(conn.status(f'"{name}"', "(UIDNEXT)"))[0].decode()
    finally:
        conn.logout()
    return int(line.rsplit("UIDNEXT ", 1)[1].rstrip(")"))


# ---- fetchmail -------------------------------------------------------------------------------------------------------


@pytest.fixture
def cn_server(tmp_path: Path, tls: TlsMaterial) -> Iterator[RunningServer]:
    """A server whose certificate also carries a subject CN: fetchmail's `sslcertck` refuses one without it
    ("Server name not specified in certificate!"), even when a subjectAltName matches."""
    if shutil.which("fetchmail") is None:
        pytest.skip("fetchmail is not installed")
    d = tmp_path / "cn-tls"
    d.mkdir()
    leaf = tls.ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    tls.ca.cert_pem.write_to_path(str(d / "ca.pem"))
    material = TlsMaterial(tls.ca, d / "cert.pem", d / "key.pem")
    rs = start_server(make_instance(tmp_path / "instance", material, IMAP_LISTENERS), material)
    yield rs
    stop_server(rs)


class Fetchmail:
    def __init__(self, server: RunningServer, root: Path, ca: Path) -> None:
        self.server = server
        self.home = root / "fetchmail"
        self.home.mkdir()
        self.out = root / "fetched.mbox"
        self.ca = ca

    def run(self, options: str) -> str:
        rc = self.home / "fetchmailrc"
        rc.write_text(
            f"set no syslog\npoll localhost protocol IMAP port {self.server.ports['imaps']}\n"
            f'  user "{BOB}" there with password "{BOB_PW}"\n'
            f"  ssl sslcertck sslcertfile {self.ca}\n  folder INBOX\n  {options}\n"
            f'  mda "cat >> {self.out}"\n'
        )
        rc.chmod(0o600)
        env = dict(os.environ, FETCHMAILHOME=str(self.home))
        out = subprocess.run(["fetchmail", "-v", "-f", str(rc)], capture_output=True, text=True, timeout=120, env=env)
        log = out.stdout + out.stderr
        assert out.returncode in (0, 1), log  # 0: mail fetched, 1: no mail
        return log

    def subjects(self) -> list[str]:
        if not self.out.exists():
            return []
        return [line[9:] for line in self.out.read_text().splitlines() if line.startswith("Subject: ")]


def test_fetchmail_keep_fetches_unseen_once_and_marks_them_seen(cn_server: RunningServer, tmp_path: Path) -> None:
    fetch = Fetchmail(cn_server, tmp_path, ca_pem(cn_server))
    deliver(cn_server, "first")
    deliver(cn_server, "second")
    fetch.run("keep")
    assert fetch.subjects() == ["first", "second"]
    assert server_view(cn_server)["INBOX"] == [("first", ("\\Seen",)), ("second", ("\\Seen",))]
    log = fetch.run("keep")  # nothing unseen left: nothing fetched again
    assert fetch.subjects() == ["first", "second"], log


def test_fetchmail_no_keep_deletes_what_it_fetched(cn_server: RunningServer, tmp_path: Path) -> None:
    fetch = Fetchmail(cn_server, tmp_path, ca_pem(cn_server))
    deliver(cn_server, "old")
    fetch.run("keep")
    deliver(cn_server, "new")
    fetch.run("no keep")  # only the unseen one is fetched, and expunged
    assert fetch.subjects() == ["old", "new"]
    assert server_view(cn_server)["INBOX"] == [("old", ("\\Seen",))]
    fetch.run("fetchall no keep")
    assert fetch.subjects() == ["old", "new", "old"]
    assert server_view(cn_server)["INBOX"] == []


def test_mbsync_syncs_nested_folders_both_ways(imap_server: RunningServer, mbsync: Mbsync) -> None:
    conn = imaps(imap_server)
    ok(conn.create("Clients/Acme"))  # its parent "Clients" is only a level of hierarchy (\Noselect)
    ok(conn.append("Clients/Acme", None, None, message("acme order")))
    conn.logout()
    mbsync.add("Local/Nested", "nested locally")
    mbsync.sync()
    assert mbsync.view("Clients/Acme") == [("acme order", "")]
    view = server_view(imap_server)
    assert view["Local/Nested"] == [("nested locally", ())]
    assert mbsync.sync()  # and again, quietly: nothing is created twice
    assert server_view(imap_server) == view
