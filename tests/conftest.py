"""Shared fixtures: real TLS certificates (trustme), a real DNS server (dnslib),
and the real server on random loopback ports.

The in-process server runs on its own event loop in a background thread, so
tests drive it with ordinary blocking clients (smtplib, swaks, sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import io
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailwarden import cli
from mailwarden import config as config_mod
from mailwarden.server import InstancePaths, Server

ALICE = "alice@example.test"
BOB = "bob@example.test"
ALICE_PW = "correct horse battery staple"
BOB_PW = "tangerine orbit lantern 42"

# Cheap argon2 for tests; production defaults are checked in test_config.py.
# Loopback clients are trusted (they skip the sender checks) except in the tests
# of those checks, which override it; DNS always goes to the test DNS server.
TEST_CONFIG: dict[str, Any] = {
    "accounts.argon2_memory_kib": 8192,
    "accounts.argon2_time_cost": 1,
    "accounts.hash_concurrency": 2,
    "inbound.trusted_networks": ["127.0.0.0/8", "::1/128"],
    # Queued outbound mail stays queued, so tests can look at it; the queue runner's own
    # tests (and delivery tests) switch this off and bring a real peer.
    "queue.paused": True,
    # The connection guard (security/guard.py) applies to loopback too; the suite opens many connections from
    # 127.0.0.1 and fails AUTH on purpose, so its limits are out of reach here (tests/test_guard.py lowers them).
    "guard.greet_delay": 0.0,
    "guard.max_connections": 100_000,
    "guard.max_connections_per_minute": 1_000_000,
    "guard.max_commands_per_minute": 1_000_000,
    "guard.ip_thresholds": {
        e: 1_000_000 for e in ("auth_fail", "unknown_user", "relay", "protocol", "early_talker", "scanner")
    },
    "guard.account_threshold": 1_000_000,
}
_TEST_DNS: list[str] = []  # HOST:PORT of the session's DNS server, set by the _dns_backend fixture


def wait_until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy (a state the server reaches on its own:
    a sync interval, a log line, a timer in the kernel); fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class TlsMaterial:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "mail.example.test")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return TlsMaterial(ca, d / "cert.pem", d / "key.pem")


def run_cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """Run the real CLI in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def set_config(path: Path, values: dict[str, Any]) -> None:
    """Rewrite config keys in an instance's TOML file (always the full rendered file)."""
    cfg = config_mod.load(path)
    merged = dict(cfg.values)
    merged.update(values)
    path.write_text(config_mod.render(merged, with_docs=False))


def make_instance(root: Path, tls: TlsMaterial, overrides: dict[str, Any] | None = None) -> InstancePaths:
    code, _out, err = run_cli(
        "--dir", str(root), "init", "--domain", "example.test", "--hostname", "mail.example.test",
        "--cert", str(tls.cert), "--key", str(tls.key),
    )  # fmt: skip
    assert code == 0, err
    paths = InstancePaths(root)
    values = {f"listen.{n}": "127.0.0.1:0" for n in ("mx", "submission", "submissions", "metrics")}
    values.update({f"listen.{n}": "" for n in ("imap", "imaps", "web")})
    values.update(TEST_CONFIG)
    values["dns.servers"] = list(_TEST_DNS)  # never the machine's resolver
    values.update(overrides or {})
    set_config(paths.config, values)
    for address, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        code, _, err = run_cli("--dir", str(root), "user", "add", address, "--password-stdin", stdin=password + "\n")
        assert code == 0, err
    return paths


@dataclass
class RunningServer:
    paths: InstancePaths
    tls: TlsMaterial
    server: Server
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> str:
        return str(self.paths.root)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_filed(self) -> None:
        """Block until every accepted message has been filed."""
        self.call(self.server.filer.drained())

    def cli(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        return run_cli("--dir", self.dir, *args, stdin=stdin)

    def inbox(self, address: str, folder: str = "INBOX") -> list[list[str]]:
        """`mailbox ls` rows (uid, date, from, subject), as a user would read them."""
        self.wait_filed()
        code, out, err = self.cli("mailbox", "ls", address, "--folder", folder)
        assert code == 0, err
        return [line.split("\t") for line in out.splitlines()[1:]]

    def message(self, address: str, uid: int, folder: str = "INBOX") -> bytes:
        self.wait_filed()
        return self.call(self.server.store.read_message(address, folder, uid))


def start_server(paths: InstancePaths, tls: TlsMaterial) -> RunningServer:
    cfg = config_mod.load(paths.config)
    loop = asyncio.new_event_loop()
    server = Server(cfg, paths)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="mailwarden-test-server", daemon=True)
    thread.start()
    started.wait(60)
    if failure:
        raise failure[0]
    rs = RunningServer(paths, tls, server, loop, thread)
    rs.ports = {name: port for name, (_host, port) in server.bound.items()}
    return rs


def stop_server(rs: RunningServer) -> None:
    asyncio.run_coroutine_threadsafe(rs.server.stop(), rs.loop).result(60)
    rs.loop.call_soon_threadsafe(rs.loop.stop)
    rs.thread.join(30)


@pytest.fixture
def instance(tmp_path: Path, tls: TlsMaterial) -> InstancePaths:
    return make_instance(tmp_path / "instance", tls)


@pytest.fixture
def server(instance: InstancePaths, tls: TlsMaterial) -> Iterator[RunningServer]:
    rs = start_server(instance, tls)
    yield rs
    stop_server(rs)


@pytest.fixture
def server_factory(tmp_path: Path, tls: TlsMaterial) -> Iterator[Any]:
    """Start a server with config overrides: server_factory({"smtp.max_recipients": 3})."""
    running: list[RunningServer] = []

    def make(overrides: dict[str, Any]) -> RunningServer:
        paths = make_instance(tmp_path / f"instance{len(running)}", tls, overrides)
        rs = start_server(paths, tls)
        running.append(rs)
        return rs

    yield make
    for rs in running:
        stop_server(rs)


# ---- real processes -------------------------------------------------------------


class ServeProcess:
    """`mailwarden serve` as a real subprocess.

    Its log (stderr) is read by a thread that copies it to serve.log and wakes
    `wait_for`, so a test waits for a log line instead of polling a file.
    """

    def __init__(self, proc: subprocess.Popen[str], ports: dict[str, int], log: Path) -> None:
        self.proc = proc
        self.ports = ports
        self.log = log
        self._lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._follow, name="serve-log", daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        assert self.proc.stderr is not None
        with open(self.log, "a") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                with self._changed:
                    self._lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def mark(self) -> int:
        """The number of log lines so far: pass it as `start` to wait for lines after now."""
        with self._changed:
            return len(self._lines)

    def wait_for(self, needles: tuple[str, ...], count: int = 1, start: int = 0, timeout: float = 30) -> list[str]:
        """The first `count` log lines from `start` on that contain one of `needles`."""

        def found() -> list[str]:
            return [line for line in self._lines[start:] if any(n in line for n in needles)]

        with self._changed:
            self._changed.wait_for(lambda: len(found()) >= count or self._eof, timeout)
            hits = found()
        if len(hits) < count:
            tail = "\n".join(self._lines[-20:])
            raise AssertionError(f"{count} x {needles!r} not logged within {timeout}s; last lines:\n{tail}")
        return hits[:count]

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)  # every log line is in serve.log once this returns
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(30)


def spawn_serve(root: Path) -> ServeProcess:
    """`mailwarden serve` as a real subprocess; returns once it printed event=ready."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailwarden", "--dir", str(root), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so a test can kill -9 every worker at once
    )
    serve = ServeProcess(proc, {}, root / "serve.log")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("event=ready"):
        proc.kill()
        serve.wait(10)
        raise RuntimeError(f"server did not start: {line!r}; log: {serve.log.read_text()[-2000:]}")
    for part in line.split()[1:]:
        name, _, addr = part.partition("=")
        serve.ports[name] = int(addr.rpartition(":")[2])
    return serve


# ---- DNS ------------------------------------------------------------------------


@dataclass
class DnsServer:
    """A real DNS server on 127.0.0.1 serving zones the test declares.

    `servfail` and `silent` hold names (lower case, no trailing dot) that get a
    SERVFAIL or no answer at all (a timeout); `queries` records every question.
    """

    host: str
    port: int
    records: list[Any]  # dnslib RR objects
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)
    authenticated: set[str] = field(default_factory=set)  # names whose answers carry the AD bit (DANE tests)

    def add(self, zone_text: str) -> None:
        from dnslib import RR

        self.records.extend(RR.fromZone(zone_text))

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@pytest.fixture(scope="session", autouse=True)
def _dns_backend() -> Iterator[DnsServer]:
    """One dnslib server for the session (stopping one takes a second); tests share it."""
    from dnslib import QTYPE, RCODE, DNSError
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    class QuietLogger(DNSLogger):
        def __init__(self) -> None:
            super().__init__(log="-recv,-send,-request,-reply,-truncated,-error,-data", prefix=False)

    state = DnsServer("127.0.0.1", 0, [])

    class ZoneResolver(BaseResolver):
        def resolve(self, request: Any, handler: Any) -> Any:
            reply = request.reply()
            qname, qtype = request.q.qname, request.q.qtype
            name = str(qname).rstrip(".").lower()
            state.queries.append((name, QTYPE[qtype]))
            if name in state.silent:
                raise DNSError("silent")  # dnslib then sends nothing: the client times out
            if name in state.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            # dnslib's reply() copies the query's flags, AD included: set it only where a test says
            # "DNSSEC-secure", as a validating resolver would.
            reply.header.ad = 1 if name in state.authenticated else 0
            known = False
            for rr in state.records:
                if rr.rname == qname:
                    known = True
                    if rr.rtype == qtype or qtype == QTYPE.ANY or rr.rtype == QTYPE.CNAME:
                        reply.add_answer(rr)
            if not known:
                reply.header.rcode = RCODE.NXDOMAIN
            if not reply.rr:
                for rr in state.records:  # the zone's SOA, for negative caching (RFC 2308)
                    if rr.rtype == QTYPE.SOA and (qname == rr.rname or qname.matchSuffix(rr.rname)):
                        reply.add_auth(rr)
                        break
            return reply

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    udp = DNSServer(ZoneResolver(), port=port, address="127.0.0.1", logger=QuietLogger())
    tcp = DNSServer(ZoneResolver(), port=port, address="127.0.0.1", tcp=True, logger=QuietLogger())
    udp.start_thread()
    tcp.start_thread()
    state.port = port
    _TEST_DNS[:] = [f"127.0.0.1:{port}"]
    try:
        yield state
    finally:
        udp.stop()
        tcp.stop()


@pytest.fixture
def dns_server(_dns_backend: DnsServer) -> Iterator[DnsServer]:
    """The shared DNS server, emptied for this test."""
    state = _dns_backend
    state.records.clear()
    state.servfail.clear()
    state.silent.clear()
    state.queries.clear()
    state.authenticated.clear()
    yield state


# ---- IMAP: a server with both IMAP listeners, and a logged-in imaplib session -------------------------

IMAP_LISTENERS = {"listen.imap": "127.0.0.1:0", "listen.imaps": "127.0.0.1:0"}


@pytest.fixture
def imap_server(server_factory: Any) -> RunningServer:
    return server_factory(IMAP_LISTENERS)


def imaps(server: RunningServer, user: str = BOB, password: str = BOB_PW) -> imaplib.IMAP4_SSL:
    conn = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls.client_context(), timeout=30)
    if user:
        conn.login(user, password)
    return conn


@pytest.fixture
def bob(imap_server: RunningServer) -> Iterator[imaplib.IMAP4_SSL]:
    conn = imaps(imap_server)
    yield conn
    try:
        conn.logout()
    except Exception:
        pass
