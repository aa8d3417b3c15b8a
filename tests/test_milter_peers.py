"""Real filters through our milter client: rspamd, SpamAssassin (spamass-milter + spamd), ClamAV (clamav-milter + clamd).

Each daemon is started once per test session on free loopback ports with its
own folder, offline (rspamd's network modules off, spamd with local tests
only, clamd with a signature the fixture writes), and stopped by its PID.
A test skips only when the daemon's binary is not installed.
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ALICE, DnsServer, RunningServer, wait_until

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_ADD_HEADER = "Y" + GTUBE[1:]  # rspamd's test pattern for its "add header" action
CLAM_EXE = Path("/usr/share/clamav-testfiles/clam.exe")
SENDER = "someone@sender.test"


def need(*binaries: str) -> None:
    for b in binaries:
        if shutil.which(b) is None:
            pytest.skip(f"{b} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Daemons:
    """Started processes, stopped by PID at the end of the session."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def alive(self, proc: subprocess.Popen[bytes], log: Path) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        return True

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="session")
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.stop()


RSPAMD_CONF = """
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    enable_test_patterns = true;
    dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }}
}}
logging {{ type = "file"; filename = "$LOGDIR/rspamd.log"; level = "warning"; }}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    upstream "local" {{ default = yes; self_scan = yes; }}
    count = 1;
    spam_header = "X-Spam";
}}
"""
# Modules that look things up on the network: offline they only wait out their timeouts.
RSPAMD_OFF = [
    "rbl",
    "surbl",
    "dcc",
    "fuzzy_check",
    "once_received",
    "asn",
    "emails",
    "phishing",
    "url_redirector",
    "hfilter",
    "spf",
    "dkim",
    "dmarc",
    "arc",
    "multimap",
    "ratelimit",
    "greylist",
    "replies",
    "neural",
    "reputation",
    "history_redis",
    "bayes_expiry",
    "mx_check",
]


@pytest.fixture(scope="session")
def rspamd(daemons: Daemons, tmp_path_factory: pytest.TempPathFactory) -> str:
    need("rspamd")
    d = tmp_path_factory.mktemp("rspamd")
    (d / "local.d").mkdir()
    for module in RSPAMD_OFF:
        (d / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
    (d / "local.d" / "milter_headers.conf").write_text(
        'use = ["x-spamd-result", "x-rspamd-server", "x-spam-status"];\nskip_local = false;\n'
        "skip_authenticated = false;\n"
    )
    port = free_port()
    (d / "rspamd.conf").write_text(RSPAMD_CONF.format(port=port))
    variables = [f"--var={name}={d}" for name in ("LOCAL_CONFDIR", "RUNDIR", "LOGDIR", "DBDIR")]
    log = d / "stdout.log"
    proc = daemons.start(
        ["rspamd", "-f", "-i", "-u", "root", "-g", "root", "-c", str(d / "rspamd.conf"), *variables], log
    )
    wait_until(lambda: daemons.alive(proc, log) and listening(port), 60, "rspamd's milter port")
    return f"inet:127.0.0.1:{port}"


@pytest.fixture(scope="session")
def spamassassin(daemons: Daemons, tmp_path_factory: pytest.TempPathFactory) -> str:
    need("spamd", "spamc", "spamass-milter")
    d = tmp_path_factory.mktemp("spamassassin")
    spamd_port, milter_port = free_port(), free_port()
    log = d / "spamd.log"
    spamd = daemons.start(
        ["spamd", "-x", "-L", "-u", "debian-spamd", f"--listen=127.0.0.1:{spamd_port}", "--max-children=2"], log
    )
    wait_until(lambda: daemons.alive(spamd, log) and listening(spamd_port), 90, "spamd's port")
    mlog = d / "milter.log"
    milter = daemons.start(
        ["spamass-milter", "-p", f"inet:{milter_port}@127.0.0.1", "-r", "15", "--", "-d", "127.0.0.1",
         "-p", str(spamd_port)],
        mlog,
    )  # fmt: skip
    wait_until(lambda: daemons.alive(milter, mlog) and listening(milter_port), 30, "spamass-milter's port")
    return f"inet:127.0.0.1:{milter_port}"


@pytest.fixture(scope="session")
def clamav(daemons: Daemons, tmp_path_factory: pytest.TempPathFactory) -> str:
    need("clamd", "clamav-milter", "sigtool")
    if not CLAM_EXE.exists():
        pytest.skip("clamav-testfiles is not installed")
    d = tmp_path_factory.mktemp("clamav")
    # Our own signature: the MD5 of the test file (sigtool --md5), under a name the test can look for.
    md5 = subprocess.run(["sigtool", "--md5", str(CLAM_EXE)], check=True, capture_output=True, text=True).stdout
    digest, size, _name = md5.strip().split(":")
    (d / "local.hdb").write_text(f"{digest}:{size}:Mailwarden-Test-Virus\n")
    sock = d / "clamd.sock"
    (d / "clamd.conf").write_text(
        f"Foreground yes\nDatabaseDirectory {d}\nLocalSocket {sock}\nUser root\nTemporaryDirectory {d}\n"
        f"LogFile {d}/clamd.log\n"
    )
    port = free_port()
    (d / "milter.conf").write_text(
        f"Foreground yes\nMilterSocket inet:{port}@127.0.0.1\nClamdSocket unix:{sock}\nUser root\n"
        f'OnInfected Reject\nOnFail Defer\nRejectMsg "Virus found: %v"\nAddHeader Replace\nLogFile {d}/milter.log\n'
        f"TemporaryDirectory {d}\n"
    )
    log = d / "clamd.out"
    clamd = daemons.start(["clamd", "-c", str(d / "clamd.conf")], log)
    wait_until(lambda: daemons.alive(clamd, log) and sock.exists(), 60, "clamd's socket")
    mlog = d / "milter.out"
    milter = daemons.start(["clamav-milter", "-c", str(d / "milter.conf")], mlog)
    wait_until(lambda: daemons.alive(milter, mlog) and listening(port), 30, "clamav-milter's port")
    return f"inet:127.0.0.1:{port}"


def milter(name: str, address: str) -> dict[str, Any]:
    return {"name": name, "address": address, "timeout": 30, "eom_timeout": 60}


def message(body: str, subject: str = "hello", attachment: bytes | None = None) -> bytes:
    head = (
        f"From: Someone <{SENDER}>\r\nTo: {ALICE}\r\nSubject: {subject}\r\nDate: {formatdate()}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}.{free_port()}@sender.test>\r\nMIME-Version: 1.0\r\n"
    )
    if attachment is None:
        return (head + f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n").encode()
    encoded = base64.encodebytes(attachment).decode().replace("\n", "\r\n")
    return (
        head + 'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
        f"{body}\r\n--b1\r\nContent-Type: application/octet-stream; name=tool.dat\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}--b1--\r\n"
    ).encode()


def send(rs: RunningServer, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", rs.ports["mx"], timeout=60) as c:
        c.ehlo("mx.sender.test")
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt(ALICE)[0] == 250
        return c.data(data)


def delivered(rs: RunningServer, folder: str = "INBOX") -> dict[str, bytes]:
    """Subject -> stored message, for the messages in Alice's folder."""
    return {row[3]: rs.message(ALICE, int(row[0]), folder) for row in rs.inbox(ALICE, folder)}


def test_rspamd_rejects_or_junks_by_its_action_and_adds_its_headers(server_factory, rspamd: str) -> None:  # type: ignore[no-untyped-def]
    rs = server_factory({"milter.milters": [milter("rspamd", rspamd)]})
    code, text = send(rs, message(GTUBE, "reject action"))
    assert code == 554 and b"Gtube pattern" in text, text
    assert send(rs, message(GTUBE_ADD_HEADER, "add header action"))[0] == 250
    assert send(rs, message("Lunch on Friday? The usual place at noon.", "clean"))[0] == 250
    junk = delivered(rs, "Junk")
    assert list(junk) == ["add header action"] and b"\r\nX-Spam: Yes\r\n" in junk["add header action"]
    inbox = delivered(rs)
    assert list(inbox) == ["clean"]
    head = inbox["clean"].partition(b"\r\n\r\n")[0]
    assert b"\r\nX-Spamd-Result: default: False [" in head and b"\r\nX-Rspamd-Server: " in head


def test_spamassassin_rejects_gtube_at_the_threshold(server_factory, spamassassin: str) -> None:  # type: ignore[no-untyped-def]
    rs = server_factory({"milter.milters": [milter("spamassassin", spamassassin)]})
    code, text = send(rs, message(GTUBE, "gtube"))
    assert (code, text) == (550, b"5.7.1 Blocked by SpamAssassin")
    assert send(rs, message("Lunch on Friday? The usual place at noon.", "clean"))[0] == 250
    assert rs.inbox(ALICE, "Junk") == []
    stored = delivered(rs)["clean"]
    assert b"\r\nX-Spam-Checker-Version: SpamAssassin" in stored and b"\r\nX-Spam-Status: No," in stored


def test_clamav_rejects_infected_mail_naming_the_virus(  # type: ignore[no-untyped-def]
    server_factory, clamav: str, dns_server: DnsServer
) -> None:
    # Untrusted client: the scanner's result goes through the inbound verdict, and its reply still reaches us.
    rs = server_factory({"milter.milters": [milter("clamav", clamav)], "inbound.trusted_networks": []})
    code, text = send(rs, message("see the tool", "infected", CLAM_EXE.read_bytes()))
    assert code == 550 and text.startswith(b"5.7.1 ") and b"Mailwarden-Test-Virus" in text, text
    assert send(rs, message("see the tool", "clean attachment", b"just some bytes"))[0] == 250
    stored = delivered(rs)["clean attachment"]
    assert b"\r\nX-Virus-Scanned: clamav-milter" in stored and b"\r\nX-Virus-Status: Clean" in stored


def test_real_filters_in_order(server_factory, clamav: str, spamassassin: str, rspamd: str) -> None:  # type: ignore[no-untyped-def]
    rs = server_factory(
        {"milter.milters": [milter("clamav", clamav), milter("spamassassin", spamassassin), milter("rspamd", rspamd)]}
    )
    code, text = send(rs, message(GTUBE, "gtube"))
    assert (code, text) == (550, b"5.7.1 Blocked by SpamAssassin")  # SpamAssassin comes before rspamd
    code, text = send(rs, message(GTUBE, "virus and gtube", CLAM_EXE.read_bytes()))
    assert code == 550 and b"Mailwarden-Test-Virus" in text  # ClamAV first
    assert send(rs, message("Lunch on Friday? The usual place at noon.", "clean"))[0] == 250
    head = delivered(rs)["clean"].partition(b"\r\n\r\n")[0]
    order = [head.index(h) for h in (b"X-Virus-Scanned:", b"X-Spam-Checker-Version:", b"X-Spamd-Result:")]
    assert order == sorted(order)
