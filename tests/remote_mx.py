"""Real remote MX hosts for the delivery tests: a private Postfix, an HTTPS MTA-STS policy server, helpers.

`RemoteMx` runs Debian's Postfix with its own config, queue and log (`postfix -c DIR`, no
chroot, /etc/postfix untouched) on three loopback addresses, all on one free port, since the
transport under test has one `delivery.port`:

* 127.0.0.2 (`a.mx.test`, `b.mx.test`): STARTTLS with a trustme certificate for those names; the
  chain file also holds the CA certificate, so DANE-TA (usage 2) can match it;
* 127.0.0.3 (`plain.mx.test`): no STARTTLS at all (a "STARTTLS stripped" path);
* 127.0.0.4 (`rogue.mx.test`): STARTTLS with a certificate from another CA (it does not verify).

Every address in a `*.test` domain is a virtual mailbox: virtual(8) delivers all of them, as
`nobody`, to one Maildir (vmail/all/); `messages(address)` picks them by Delivered-To. `tempfail@...` gets 450 4.2.1 and `reject@...`
550 5.1.1 at RCPT (check_recipient_access). smtpd logs its TLS sessions (smtpd_tls_loglevel = 1).

Fixtures here are imported by the test modules that use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailwarden import config as config_mod
from mailwarden.dns.resolver import Resolver
from mailwarden.outbound.delivery import MxTransport
from tests.conftest import wait_until

GOOD_IP, PLAIN_IP, ROGUE_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
POLICY_IP = "127.0.0.5"
MX_ZONE = f"""
a.mx.test. 300 IN A {GOOD_IP}
b.mx.test. 300 IN A {GOOD_IP}
plain.mx.test. 300 IN A {PLAIN_IP}
rogue.mx.test. 300 IN A {ROGUE_IP}
"""
TRACE_HEADERS = (b"return-path:", b"x-original-to:", b"delivered-to:", b"received:")


def free_port(addresses: tuple[str, ...]) -> int:
    """A TCP port free on every one of `addresses`."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        socks = []
        try:
            for address in addresses:
                s = socket.socket()
                socks.append(s)
                s.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")


@dataclass
class RemoteMx:
    root: Path
    ca: trustme.CA
    port: int = 0
    good_cert_der: bytes = b""  # leaf certificate of 127.0.0.2 (DER)
    rogue_cert_der: bytes = b""
    started: bool = False

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def log(self) -> Path:
        return self.root / "maillog"

    def messages(self, address: str) -> list[bytes]:
        """Messages delivered for `address` (virtual(8) writes a Delivered-To header for it)."""
        d = self.root / "vmail" / "all" / "new"
        if not d.is_dir():
            return []
        needle = f"\nDelivered-To: {address}\n".encode()
        found = []
        for p in sorted(d.iterdir()):
            data = p.read_bytes()
            if needle in data.split(b"\n\n", 1)[0] + b"\n" or data.startswith(needle[1:]):
                found.append(data)
        return found

    def wait_messages(self, address: str, count: int = 1) -> list[bytes]:
        return wait_until(
            lambda: len(self.messages(address)) >= count and self.messages(address), what=f"mail for {address}"
        )

    def mark(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, mark: int) -> str:
        with contextlib.suppress(FileNotFoundError), open(self.log, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")
        return ""

    def wait_log(self, mark: int, needle: str, count: int = 1) -> str:
        return wait_until(
            lambda: (text := self.log_since(mark)).count(needle) >= count and text, what=f"{needle!r} in Postfix log"
        )

    def start(self) -> None:
        nobody = pwd.getpwnam("nobody")
        for sub in ("etc", "queue", "data", "vmail", "tls"):
            (self.root / sub).mkdir(parents=True)
        os.chown(self.root / "data", pwd.getpwnam("postfix").pw_uid, -1)
        os.chown(self.root / "vmail", nobody.pw_uid, nobody.pw_gid)
        tls = self.root / "tls"
        good = self.ca.issue_cert("a.mx.test", "b.mx.test")
        good.private_key_pem.write_to_path(str(tls / "good.key"))
        (tls / "good.pem").write_bytes(b"".join(p.bytes() for p in good.cert_chain_pems) + self.ca.cert_pem.bytes())
        self.good_cert_der = ssl.PEM_cert_to_DER_cert(good.cert_chain_pems[0].bytes().decode())
        rogue = trustme.CA().issue_cert("rogue.mx.test")
        rogue.private_key_pem.write_to_path(str(tls / "rogue.key"))
        rogue.cert_chain_pems[0].write_to_path(str(tls / "rogue.pem"))
        self.rogue_cert_der = ssl.PEM_cert_to_DER_cert(rogue.cert_chain_pems[0].bytes().decode())
        for f in tls.iterdir():
            f.chmod(0o644)
        master_cf = Path("/usr/share/postfix/master.cf.dist")
        shutil.copy(master_cf if master_cf.exists() else Path("/etc/postfix/master.cf"), self.etc / "master.cf")
        (self.etc / "domains").write_text("/\\.test$/ OK\n")
        (self.etc / "access").write_text(
            "/^tempfail@/ 450 4.2.1 Mailbox busy, try again later\n/^reject@/ 550 5.1.1 No such user here\n"
        )
        self.port = free_port((GOOD_IP, PLAIN_IP, ROGUE_IP))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.root / "queue",
            "data_directory": self.root / "data",
            "syslog_name": "postfix-remote-mx",
            "maillog_file": self.log,
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
            "myhostname": "remote.mx.test",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": "",
            "inet_interfaces": "127.0.0.1",  # must be an interface address; the listeners name their own
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.250/32",
            "smtpd_recipient_restrictions": f"check_recipient_access regexp:{self.etc / 'access'}, reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            "disable_dns_lookups": "yes",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "in_flow_delay": "0",
            "biff": "no",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": tls / "good.pem",
            "smtpd_tls_key_file": tls / "good.key",
            "smtpd_tls_loglevel": "1",
            "virtual_mailbox_domains": f"regexp:{self.etc / 'domains'}",
            "virtual_mailbox_maps": "static:all/",  # one Maildir for all; tests pick by Delivered-To
            "virtual_mailbox_base": self.root / "vmail",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        pc = ["postconf", "-c", str(self.etc)]
        _run([*pc, "-MX", "smtp/inet"])
        smtpd = "inet n - n - - smtpd"
        _run([*pc, "-M", f"{GOOD_IP}:{self.port}/inet={GOOD_IP}:{self.port} {smtpd}"])
        _run(
            [*pc, "-M", f"{PLAIN_IP}:{self.port}/inet={PLAIN_IP}:{self.port} {smtpd} -o smtpd_tls_security_level=none"]
        )
        _run(
            [
                *pc,
                "-M",
                f"{ROGUE_IP}:{self.port}/inet={ROGUE_IP}:{self.port} {smtpd}"
                f" -o smtpd_tls_cert_file={tls / 'rogue.pem'} -o smtpd_tls_key_file={tls / 'rogue.key'}",
            ]
        )
        _run([*pc, "-F", "*/*/chroot=n"])
        _run(["postfix", "-c", str(self.etc), "check"])
        _run(["postfix", "-c", str(self.etc), "start"])
        self.started = True
        for ip in (GOOD_IP, PLAIN_IP, ROGUE_IP):
            wait_until(lambda ip=ip: _connects(ip, self.port), 30, f"Postfix on {ip}:{self.port}")

    def stop(self) -> None:
        if not self.started:
            return
        pid_file = self.root / "queue" / "pid" / "master.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
        if pid:
            wait_until(lambda: not _alive(pid), 20, "Postfix master to stop")
        self.started = False


def _connects(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


_SHARED: dict[str, Any] = {"mx": None, "base": None, "users": 0}


@pytest.fixture(scope="session")
def remote_mx() -> Iterator[RemoteMx]:
    """One Postfix for the whole run, though each test module imports this fixture (a reference count)."""
    missing = [t for t in ("postfix", "postconf") if not shutil.which(t)]
    if missing:
        pytest.skip(f"needs Debian's postfix ({', '.join(missing)} not found)")
    if _SHARED["mx"] is None:
        base = Path(tempfile.mkdtemp(prefix="mw-remote-mx-"))
        base.chmod(0o755)  # postfix and nobody must traverse it
        mx = RemoteMx(base / "postfix", trustme.CA())
        try:
            mx.start()
        except BaseException:
            mx.stop()
            shutil.rmtree(base, ignore_errors=True)
            raise
        _SHARED.update(mx=mx, base=base)
    _SHARED["users"] += 1
    try:
        yield _SHARED["mx"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["mx"].stop()
            shutil.rmtree(_SHARED["base"], ignore_errors=True)
            _SHARED.update(mx=None, base=None)


def make_transport(
    tmp_path: Path, dns_address: tuple[str, int], port: int, ca: trustme.CA, **values: Any
) -> MxTransport:
    """An MxTransport built the way the server builds it: `MxTransport.from_config` from a validated Config."""
    ca_file = tmp_path / "ca.pem"
    if not ca_file.exists():
        ca.cert_pem.write_to_path(str(ca_file))
    raw: dict[str, dict[str, Any]] = {
        "server": {"hostname": "out.mailwarden.test"},
        "delivery": {"port": port, "ca_file": str(ca_file), "connect_timeout": 5.0, "command_timeout": 10.0},
    }
    for key, value in values.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    cfg = config_mod.validate(raw, tmp_path)
    resolver = Resolver([dns_address], timeout=1.0)
    return MxTransport.from_config(cfg, resolver)


def message(subject: str, to: str, body: bytes = b"Hello from Mailwarden.\r\n") -> bytes:
    return (
        b"From: sender@origin.test\r\nTo: "
        + to.encode()
        + b"\r\nSubject: "
        + subject.encode()
        + b"\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <"
        + subject.encode().replace(b" ", b"-")
        + b"@origin.test>\r\n\r\n"
        + body
    )


def without_trace(stored: bytes) -> bytes:
    """A Maildir file as the sender wrote it: Postfix's trace headers removed, LF back to CRLF."""
    lines = stored.split(b"\n")
    i = 0
    while i < len(lines) and lines[i].lower().startswith(TRACE_HEADERS):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


# ---- MTA-STS policy server ------------------------------------------------------


@dataclass
class Reply:
    body: bytes
    status: str = "200 OK"
    content_type: str = "text/plain"
    extra_headers: str = ""
    chunked: bool = False


@dataclass
class PolicyServer:
    """HTTPS on POLICY_IP with a trustme certificate for mta-sts.<domain> of each domain; one reply per Host."""

    ca: trustme.CA
    domains: tuple[str, ...]
    replies: dict[str, Reply] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _server: Any = None

    async def __aenter__(self) -> PolicyServer:
        cert = self.ca.issue_cert(*(f"mta-sts.{d}" for d in self.domains))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self._server = await asyncio.start_server(self._handle, POLICY_IP, 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def zone(self) -> str:
        return "".join(f"mta-sts.{d}. 300 IN A {POLICY_IP}\n" for d in self.domains)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            host = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("host:")), "")
            self.requests.append(f"{host} {lines[0]}")
            reply = self.replies.get(host, Reply(b"not found", "404 Not Found"))
            if reply.chunked:
                body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in _chunks(reply.body, 1000)) + b"0\r\n\r\n"
                framing = "Transfer-Encoding: chunked\r\n"
            else:
                body, framing = reply.body, f"Content-Length: {len(reply.body)}\r\n"
            writer.write(
                f"HTTP/1.1 {reply.status}\r\nContent-Type: {reply.content_type}\r\n{framing}{reply.extra_headers}"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> bytes:
    return (
        f"version: STSv1\r\nmode: {mode}\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n"
    ).encode()
