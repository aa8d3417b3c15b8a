"""Hostile and broken clients against the real server, over raw sockets.

Each test checks what the client sees on the wire, and that the server goes on
serving other clients afterwards (a second client completes a delivery that
lands in Bob's inbox).
"""

from __future__ import annotations

import logging
import random
import re
import smtplib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import BOB, RunningServer

HELO = b"client.remote.test"
SMUGGLED = (
    b"MAIL FROM:<x@y>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    b"From: x@y\r\nSubject: smuggled\r\n\r\nI was not sent by the first client.\r\n.\r\n"
)
VERBS = {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "AUTH", "STARTTLS"}
CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class Closed(Exception):
    """The server closed the connection."""


class Client:
    """A raw SMTP client: sends exactly the bytes given, reads replies line by line."""

    def __init__(self, port: int, timeout: float = 10, greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.raw = b""  # every byte received, for checks on what the server echoes
        if greet:
            code, text = self.reply()
            assert code == 220, text

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(self.buf)
            self.raw += chunk
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply_lines(self) -> list[bytes]:
        """One (possibly multi-line) reply, without the CRLFs."""
        lines = [self._line()]
        while lines[-1][3:4] == b"-":
            lines.append(self._line())
        return lines

    def reply(self) -> tuple[int, bytes]:
        """(code, text of the last line), e.g. (250, b"2.1.0 Sender OK")."""
        last = self.reply_lines()[-1]
        return int(last[:3]), last[4:]

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def replies(self, n: int) -> list[tuple[int, bytes]]:
        return [self.reply() for _ in range(n)]

    def is_closed(self) -> bool:
        """True once the server has closed the connection (waits up to the socket timeout)."""
        try:
            self._line()
        except Closed:
            return True
        return False

    def close(self) -> None:
        self.sock.close()

    def begin_data(self, rcpt: bytes = BOB.encode()) -> None:
        assert self.cmd(b"EHLO " + HELO)[0] == 250
        assert self.cmd(b"MAIL FROM:<sender@remote.test>")[0] == 250
        assert self.cmd(b"RCPT TO:<" + rcpt + b">")[0] == 250
        assert self.cmd(b"DATA")[0] == 354


def message(subject: str) -> bytes:
    return f"From: sender@remote.test\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


def subjects(server: RunningServer) -> list[str]:
    return [row[3] for row in server.inbox(BOB)]


def assert_still_serving(server: RunningServer) -> None:
    """Another client can still complete a delivery, and it is filed."""
    subject = f"still serving {uuid.uuid4().hex[:8]}"
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=10) as c:
        c.ehlo("second.remote.test")
        assert c.sendmail("sender@remote.test", [BOB], message(subject)) == {}
    assert subject in subjects(server)


def outstanding(server: RunningServer) -> int:
    async def count() -> int:  # read on the server's loop, not from this thread
        return server.server.spool.outstanding()

    return server.call(count())


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A hostile client must never reach the session's catch-all handler."""
    caplog.set_level(logging.INFO, logger="mailwarden")
    yield
    bad = [r.getMessage() for r in caplog.records if "event=internal_error" in r.getMessage()]
    assert not bad, bad


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    c = Client(server.ports["mx"])
    yield c
    c.close()


# ---- garbage and error budget ------------------------------------------------------------


def garbage_lines(n: int, seed: int = 20240601) -> list[bytes]:
    rng = random.Random(seed)
    lines: list[bytes] = []
    while len(lines) < n:
        line = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))).replace(b"\r", b"").replace(b"\n", b"")
        verb = line.partition(b" ")[0].decode("latin-1").upper()
        if verb in VERBS:
            continue
        lines.append(line)
    return lines


def test_garbage_commands_get_5xx_and_max_errors_closes_with_421(server: RunningServer, client: Client) -> None:
    lines = garbage_lines(20)
    seen = set()
    for line in lines[:19]:
        code, text = client.cmd(line)
        seen.add((code, text[:5]))
    assert seen <= {(502, b"5.5.1"), (500, b"5.5.2"), (501, b"5.5.4")}, seen
    assert (502, b"5.5.1") in seen and (501, b"5.5.4") in seen  # the seed gives a mix
    code, text = client.cmd(lines[19])  # the 20th error (smtp.max_errors default)
    assert code // 100 == 5
    code, text = client.reply()
    assert (code, text[:5]) == (421, b"4.7.0")
    assert client.is_closed()
    assert_still_serving(server)


def test_error_budget_counts_5xx_from_real_commands_too(server_factory) -> None:
    server = server_factory({"smtp.max_errors": 3})
    c = Client(server.ports["mx"])
    assert c.cmd(b"MAIL FROM:<a@b>")[0] == 503  # no EHLO yet
    assert c.cmd(b"RCPT TO:<bob@example.test>")[0] == 503
    assert c.cmd(b"NOOP")[0] == 250
    code, _ = c.cmd(b"BOGUS")
    assert code == 502
    assert c.reply()[0] == 421
    assert c.is_closed()
    assert_still_serving(server)


# ---- over-long lines, NUL, bad UTF-8 -------------------------------------------------------


def test_megabyte_command_line_with_newline_gets_500_5_5_2(server: RunningServer, client: Client) -> None:
    client.send(b"NOOP " + b"x" * 1_000_000 + b"\r\nNOOP\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (500, b"5.5.2")
    assert b"too long" in text.lower()
    assert client.reply()[0] == 250  # the next command is read normally
    assert_still_serving(server)


def test_megabyte_without_newline_then_newline_gets_500_5_5_2(server: RunningServer, client: Client) -> None:
    for _ in range(16):
        client.send(b"y" * 65536)
    client.send(b"\r\nNOOP\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (500, b"5.5.2")
    assert client.reply()[0] == 250
    assert_still_serving(server)


def test_megabyte_without_newline_then_disconnect(server: RunningServer) -> None:
    c = Client(server.ports["mx"])
    c.send(b"z" * 1_000_000)
    c.sock.shutdown(socket.SHUT_WR)
    # The server reads to EOF and closes; if it says anything, it is "line too long".
    while True:
        try:
            code, text = c.reply()
        except Closed:
            break
        assert (code, text[:5]) == (500, b"5.5.2")
    c.close()
    assert_still_serving(server)


def test_command_line_just_over_the_limit_and_just_under(server: RunningServer, client: Client) -> None:
    # smtp.max_command_line = 2048, CRLF included
    assert client.cmd(b"NOOP " + b"a" * (2048 - 7))[0] == 250
    code, text = client.cmd(b"NOOP " + b"a" * (2048 - 6))
    assert (code, text[:5]) == (500, b"5.5.2")
    assert client.cmd(b"NOOP")[0] == 250


@pytest.mark.parametrize("line", [b"NOOP\x00", b"\x00NOOP", b"MAIL FROM:<a\x00@remote.test>", b"\x00"])
def test_nul_byte_in_command_gets_500_5_5_2(server: RunningServer, client: Client, line: bytes) -> None:
    assert client.cmd(b"EHLO " + HELO)[0] == 250
    code, text = client.cmd(line)
    assert (code, text[:5]) == (500, b"5.5.2")
    assert client.cmd(b"NOOP")[0] == 250
    assert_still_serving(server)


def test_invalid_utf8_in_mail_from_and_rcpt_to_gets_501_5_5_4(server: RunningServer, client: Client) -> None:
    assert client.cmd(b"EHLO " + HELO)[0] == 250
    code, text = client.cmd(b"MAIL FROM:<\xff\xfe@remote.test>")
    assert (code, text[:5]) == (501, b"5.5.4")
    code, text = client.cmd(b"MAIL FROM:<sender@remote.test>")
    assert code == 250
    code, text = client.cmd(b"RCPT TO:<\xc3\x28ob@example.test>")
    assert (code, text[:5]) == (501, b"5.5.4")
    code, text = client.cmd(b"RCPT TO:<bob@\xed\xa0\x80example.test>")  # an encoded surrogate
    assert (code, text[:5]) == (501, b"5.5.4")
    assert client.cmd(b"RCPT TO:<bob@example.test>")[0] == 250
    assert client.cmd(b"RSET")[0] == 250
    assert_still_serving(server)


# ---- recipients flood --------------------------------------------------------------------


def test_ten_thousand_pipelined_rcpts(server: RunningServer, client: Client) -> None:
    assert client.cmd(b"EHLO " + HELO)[0] == 250
    assert client.cmd(b"MAIL FROM:<sender@remote.test>")[0] == 250
    flood = b"RCPT TO:<bob@example.test>\r\n" * 10_000
    # Send from a thread: the replies must be read while the commands still go out.
    sender = threading.Thread(target=client.send, args=(flood,))
    sender.start()
    replies = client.replies(10_000)
    sender.join(30)
    counts: dict[tuple[int, bytes], int] = {}
    for code, text in replies:
        counts[(code, text[:5])] = counts.get((code, text[:5]), 0) + 1
    assert set(counts) <= {(250, b"2.1.5"), (452, b"4.5.3")}, counts
    assert counts[(250, b"2.1.5")] == 100  # smtp.max_recipients
    assert counts[(452, b"4.5.3")] == 9_900
    assert client.cmd(b"RSET")[0] == 250
    assert client.cmd(b"NOOP")[0] == 250
    assert_still_serving(server)


# ---- silent and vanishing clients ------------------------------------------------------------


def test_silent_client_does_not_block_others(server: RunningServer) -> None:
    silent = socket.create_connection(("127.0.0.1", server.ports["mx"]), timeout=10)
    try:
        assert_still_serving(server)
        quiet_after_greeting = Client(server.ports["mx"])  # read the greeting, then say nothing
        assert_still_serving(server)
        quiet_after_greeting.close()
    finally:
        silent.close()


def test_silent_client_is_timed_out_with_421_4_4_2(server_factory) -> None:
    server = server_factory({"smtp.command_timeout": 1})
    c = Client(server.ports["mx"], timeout=10)
    started = time.monotonic()
    code, text = c.reply()  # nothing sent: the next thing is the timeout
    assert (code, text[:5]) == (421, b"4.4.2")
    assert c.is_closed()
    assert time.monotonic() - started < 9
    c.close()
    assert_still_serving(server)


def test_client_dropping_mid_data_delivers_nothing(server: RunningServer, client: Client) -> None:
    client.begin_data()
    client.send(b"From: sender@remote.test\r\nSubject: half a message\r\n\r\nthe first half\r\n")
    client.sock.shutdown(socket.SHUT_WR)  # the client goes away mid-DATA
    assert client.is_closed()  # the server saw the EOF and closed its side: the session is over
    assert subjects(server) == []
    assert outstanding(server) == 0
    assert_still_serving(server)
    assert outstanding(server) == 0


def test_client_resetting_mid_data_delivers_nothing(server: RunningServer) -> None:
    c = Client(server.ports["mx"])
    c.begin_data()
    c.send(b"From: sender@remote.test\r\nSubject: reset message\r\n\r\nthe first half\r\n")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # RST
    assert_still_serving(server)
    assert "reset message" not in subjects(server)
    assert outstanding(server) == 0


# ---- bare LF / CR and SMTP smuggling ---------------------------------------------------------


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n", b"NOOP\rQUIT\n", b"\n"])
def test_bare_newline_command_gets_500_5_5_2(server: RunningServer, client: Client, line: bytes) -> None:
    client.send(line)
    code, text = client.reply()
    assert (code, text[:5]) == (500, b"5.5.2")
    assert client.cmd(b"NOOP")[0] == 250


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: bare lf\n\nbody\n.\r\n",
        b"Subject: bare lf\r\n\r\nbody\n\r\n.\r\n",
        b"Subject: bare cr\r\n\r\nbo\rdy\r\n.\r\n",
        b"Subject: sloppy end\r\n\r\nbody\n.\n",
    ],
)
def test_bare_newline_in_data_gets_550_5_5_2_and_close(server: RunningServer, client: Client, body: bytes) -> None:
    client.begin_data()
    client.send(body)
    code, text = client.reply()
    assert (code, text[:5]) == (550, b"5.5.2")
    code, text = client.reply()
    assert (code, text[:5]) == (421, b"4.7.0")
    assert client.is_closed()
    assert subjects(server) == []
    assert_still_serving(server)


@pytest.mark.parametrize("seq", [b"\r\n.\n", b"\n.\r\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r"])
def test_smuggled_second_message_is_never_delivered(server: RunningServer, client: Client, seq: bytes) -> None:
    client.begin_data()
    client.send(b"From: sender@remote.test\r\nSubject: first\r\n\r\nhello" + seq + SMUGGLED + b"QUIT\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (550, b"5.5.2")
    code, text = client.reply()
    assert (code, text[:5]) == (421, b"4.7.0")
    assert client.is_closed()
    assert [line[:3] for line in client.raw.split(b"\r\n")].count(b"354") == 1  # no second DATA ever started
    assert subjects(server) == []
    assert_still_serving(server)
    assert "smuggled" not in subjects(server)


@pytest.mark.parametrize("seq", [b"\r\n.\n", b"\n.\r\n"])
def test_smuggling_after_an_over_long_line_is_never_delivered(
    server: RunningServer, client: Client, seq: bytes
) -> None:
    client.begin_data()
    long_line = b"X-Pad: " + b"a" * 70_000 + b"\r\n"  # over smtp.max_data_line (65536)
    client.send(
        b"From: sender@remote.test\r\nSubject: first\r\n" + long_line + b"\r\nhello" + seq + SMUGGLED + b"QUIT\r\n"
    )
    got = []
    while True:
        try:
            got.append(client.reply())
        except Closed:
            break
    assert "smuggled" not in subjects(server), got
    assert got[0][0] // 100 == 5


# ---- pipelining after DATA ------------------------------------------------------------------


def test_commands_pipelined_after_the_terminator_are_processed(server: RunningServer, client: Client) -> None:
    client.begin_data()
    client.send(message("pipelined one") + b".\r\nQUIT\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (250, b"2.0.0")
    code, text = client.reply()
    assert (code, text[:5]) == (221, b"2.0.0")
    assert client.is_closed()
    assert subjects(server) == ["pipelined one"]


def test_two_transactions_in_three_writes(server: RunningServer, client: Client) -> None:
    assert client.cmd(b"EHLO " + HELO)[0] == 250
    env = b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    client.send(env)
    assert [c for c, _ in client.replies(3)] == [250, 250, 354]
    client.send(message("first of two") + b".\r\n" + env)
    assert [c for c, _ in client.replies(4)] == [250, 250, 250, 354]
    client.send(message("second of two") + b".\r\nNOOP\r\nQUIT\r\n")
    assert [c for c, _ in client.replies(3)] == [250, 250, 221]
    assert client.is_closed()
    assert sorted(subjects(server)) == ["first of two", "second of two"]


# ---- no echo of control characters -----------------------------------------------------------


def test_replies_never_echo_control_characters(server: RunningServer, client: Client) -> None:
    nasty = [
        b"EHLO \x1b[2J\x07evil.test",
        b"HELO \x1b]0;pwned\x07",
        b"MAIL FROM:<\x1b[31m@remote.test>",
        b"MAIL FROM:<a@remote.test> SIZE=\x1b\x07",
        b"MAIL FROM:<sender@remote.test>",
        b"RCPT TO:<bob\x07@example.test>",
        b"RCPT TO:<\x1b[1mnobody@example.test>",
        b"RCPT TO:<x@\x1b.test>",
        b"\x1bNOOP",
        b"NOOP \x07\x1b[5m",
        b"VRFY \x1b[2J",
        b"XY\x07Z",
        b"AUTH \x1b",
        b"RSET \x07",
        b"DATA \x1b",
    ]
    for line in nasty:
        client.cmd(line)
    assert client.cmd(b"NOOP")[0] == 250
    received = client.raw
    assert received.endswith(b"\r\n")
    for line in received[:-2].split(b"\r\n"):
        assert not CONTROL.search(line), line
        assert re.match(rb"^[2-5]\d\d[ -]", line), line
    assert_still_serving(server)


# ---- STARTTLS ---------------------------------------------------------------------------------


def starttls(client: Client, server: RunningServer) -> None:
    assert client.cmd(b"STARTTLS")[0] == 220
    assert client.buf == b""
    client.sock = server.tls.client_context().wrap_socket(client.sock, server_hostname="localhost")


def test_plaintext_pipelined_behind_starttls_is_discarded(server: RunningServer, client: Client) -> None:
    assert client.cmd(b"EHLO " + HELO)[0] == 250
    client.send(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
    assert client.reply()[0] == 220
    client.sock = server.tls.client_context().wrap_socket(client.sock, server_hostname="localhost")
    # Had the injected MAIL been run, its reply would come before the EHLO reply.
    client.send(b"EHLO " + HELO + b"\r\n")
    lines = client.reply_lines()
    assert lines[0].startswith(b"250-") and b"AUTH PLAIN LOGIN" in lines[-1], lines
    assert client.cmd(b"MAIL FROM:<sender@remote.test>")[0] == 250  # no nested-MAIL error: nothing was injected


def test_smuggling_over_tls_is_refused(server: RunningServer, client: Client) -> None:
    assert client.cmd(b"EHLO " + HELO)[0] == 250
    starttls(client, server)
    client.begin_data()
    client.send(b"From: sender@remote.test\r\nSubject: first\r\n\r\nhello\r\n.\n" + SMUGGLED + b"QUIT\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (550, b"5.5.2")
    assert client.reply()[0] == 421
    assert client.is_closed()
    assert subjects(server) == []
    assert_still_serving(server)


def test_garbage_instead_of_a_tls_handshake(server: RunningServer, client: Client) -> None:
    assert client.cmd(b"EHLO " + HELO)[0] == 250
    assert client.cmd(b"STARTTLS")[0] == 220
    client.send(b"this is not a TLS ClientHello\r\n" * 10)
    assert client.is_closed()
    assert_still_serving(server)


def test_stalled_data_is_timed_out(server_factory) -> None:
    server = server_factory({"smtp.data_timeout": 1})
    c = Client(server.ports["mx"])
    c.begin_data()
    c.send(b"From: sender@remote.test\r\nSubject: stalled\r\n\r\nand then nothing")
    code, text = c.reply()
    assert (code, text[:5]) == (421, b"4.4.2")
    assert c.is_closed()
    assert subjects(server) == []
    assert outstanding(server) == 0
    assert_still_serving(server)
