"""Hostile input against the running IMAP server, raw over TLS: a 4 GiB literal, a 1 MB line, 10,000 nested
parentheses. Each gets a BAD/NO (or a closed connection), the server keeps serving new connections, and the
process's memory does not balloon (the server runs in this process, so its peak RSS is ours)."""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BOB, BOB_PW, RunningServer
from tests.test_imap_server import IMAP_LISTENERS, imaps, ok

MB = 1024 * 1024
GROWTH_BOUND = 24 * MB  # far below what buffering any of these inputs would take


@pytest.fixture
def imap_server(server_factory: Any) -> RunningServer:
    return server_factory(IMAP_LISTENERS)


class Raw:
    """A raw TLS connection: send bytes, read reply lines."""

    def __init__(self, server: RunningServer) -> None:
        sock = socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=30)
        self.tls: ssl.SSLSocket = server.tls.client_context().wrap_socket(sock, server_hostname="localhost")
        self.f = self.tls.makefile("rb")
        assert self.f.readline().startswith(b"* OK")

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)

    def line(self) -> bytes:
        return self.f.readline()

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if not line or line.startswith(tag + b" "):
                return lines

    def login(self) -> None:
        self.send(f'l LOGIN {BOB} "{BOB_PW}"\r\n'.encode())
        assert self.until_tagged(b"l")[-1].startswith(b"l OK")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()


@pytest.fixture
def raw(imap_server: RunningServer) -> Iterator[Raw]:
    conn = Raw(imap_server)
    yield conn
    conn.close()


def peak_rss() -> int:
    """Peak resident size of this process in bytes, reset first where the kernel allows it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def bounded_memory() -> Iterator[None]:
    """Fail if the process's peak RSS grows by more than GROWTH_BOUND inside the block.

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so the check measures
    this block and not an earlier test's peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    before = hwm()
    yield
    grown = hwm() - before
    assert grown < GROWTH_BOUND, f"peak RSS grew by {grown / MB:.1f} MB"


def hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return peak_rss()


def still_serves(server: RunningServer) -> None:
    conn = imaps(server)
    ok(conn.select("INBOX"))
    ok(conn.noop())
    conn.logout()


def test_4gib_synchronizing_literal_is_refused_before_any_octet(imap_server: RunningServer, raw: Raw) -> None:
    with bounded_memory():
        raw.send(b"a LOGIN {4294967295}\r\n")  # before login: 8 KiB at most
        reply = raw.line()
        assert reply.startswith(b"a NO [TOOBIG]") or reply.startswith(b"a BAD"), reply
        raw.send(b"b NOOP\r\n")  # no "+" was sent, so the next line is a new command
        assert raw.line().startswith(b"b OK")
        raw.login()
        raw.send(b"c APPEND INBOX {4294967295}\r\n")  # after login: over smtp.max_message_size
        reply = raw.line()
        assert reply.startswith(b"c NO [TOOBIG]") or reply.startswith(b"c BAD"), reply
        raw.send(b"d NOOP\r\n")
        assert raw.line().startswith(b"d OK")
    still_serves(imap_server)


def test_4gib_non_synchronizing_literal_is_discarded_unkept(imap_server: RunningServer, raw: Raw) -> None:
    raw.login()
    with bounded_memory():
        raw.send(b"a APPEND INBOX {4294967295+}\r\n")
        chunk = b"x" * (1 * MB)
        for _ in range(64):  # 64 MB of it streams through; none of it is kept
            raw.send(chunk)
        reply = raw.line()
        assert reply.startswith(b"a BAD [TOOBIG]"), reply
    raw.close()
    still_serves(imap_server)
    conn = imaps(imap_server)
    assert ok(conn.select("INBOX")) == [b"0"]  # nothing was appended
    conn.logout()


def test_1mb_line_gets_bad_and_the_session_goes_on(imap_server: RunningServer, raw: Raw) -> None:
    with bounded_memory():
        raw.send(b"a LOGIN " + b"x" * MB + b"\r\n")
        assert raw.line().startswith(b"a BAD [LIMIT]")
        raw.login()
        raw.send(b"b SEARCH " + b"ALL " * (MB // 4) + b"\r\nc NOOP\r\n")
        assert raw.line().startswith(b"b BAD [LIMIT] line too long")
        assert raw.until_tagged(b"c")[-1].startswith(b"c OK")
    still_serves(imap_server)


def test_1mb_line_without_crlf_is_cut_off(imap_server: RunningServer, raw: Raw) -> None:
    with bounded_memory():
        for _ in range(16):  # 16 MB, never a line end
            raw.send(b"y" * MB)
        raw.send(b"\r\nz NOOP\r\n")
        assert raw.until_tagged(b"z")[-1].startswith(b"z OK")
    still_serves(imap_server)


def nested(depth: int, per_line: int = 4000) -> bytes:
    """A SEARCH nested `depth` deep, cut into lines under the 8 KiB line limit by 1-octet LITERAL+ literals."""
    body = b"(" * depth + b"SEEN" + b")" * depth
    pieces = [body[i : i + per_line] for i in range(0, len(body), per_line)]
    return b"a SEARCH " + b" SUBJECT {1+}\r\nx ".join(pieces) + b"\r\n"


def test_10000_nested_parentheses_get_bad(imap_server: RunningServer, raw: Raw) -> None:
    raw.login()
    raw.send(b"s SELECT INBOX\r\n")
    raw.until_tagged(b"s")
    with bounded_memory():
        raw.send(nested(10_000))
        reply = raw.until_tagged(b"a")[-1]
        assert reply.startswith(b"a BAD [LIMIT] nested too deeply"), reply
        raw.send(b"a FETCH 1:* " + b"(" * 10_000 + b"\r\n")  # the same in one 10 KB line
        assert raw.line().startswith(b"a BAD [LIMIT]")
        raw.send(b"b NOOP\r\n")
        assert raw.until_tagged(b"b")[-1].startswith(b"b OK")
    still_serves(imap_server)


def test_flood_of_bad_commands_closes_the_connection(imap_server: RunningServer, raw: Raw) -> None:
    raw.send(b"".join(b"%d FROB\r\n" % i for i in range(50)))
    lines = []
    while line := raw.line():
        lines.append(line)
    assert lines[-1].startswith(b"* BYE") and sum(b" BAD " in x for x in lines) == 20
    still_serves(imap_server)
