"""Hypothesis against the running IMAP server: random but well-framed command sequences (odd sequence sets,
sections, partials, search trees, flags, names) and raw noise. Every command gets exactly one tagged OK, NO or BAD,
no handler fails internally (`* BYE Internal error`), and the server keeps serving afterwards.

The parser's own property tests (any split, bounded buffers) are in tests/test_imap_protocol.py."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import BOB, BOB_PW, RunningServer, TlsMaterial, make_instance, start_server, stop_server
from tests.test_imap_server import IMAP_LISTENERS, imaps, message, ok

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tls: TlsMaterial) -> Iterator[RunningServer]:
    root: Path = tmp_path_factory.mktemp("imap-fuzz")
    server = start_server(make_instance(root / "instance", tls, IMAP_LISTENERS), tls)
    conn = imaps(server)
    ok(conn.create("Other"))
    ok(conn.append("INBOX", "(\\Seen)", None, message("plain")))
    multipart = (
        b"Subject: mp\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\none\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: inner\r\n\r\ninner body\r\n--b--\r\n"
    )
    ok(conn.append("INBOX", None, None, multipart))
    conn.logout()
    yield server
    stop_server(server)


seqs = st.sampled_from(["1", "2", "*", "1:*", "2:1", "1,2", "1:2,*", "3", "4294967295", "1:4294967295", "0", "x"])
sections = st.sampled_from(
    ["", "1", "2", "2.1", "2.HEADER", "2.TEXT", "1.MIME", "3.1.1", "HEADER", "TEXT", "MIME",
     "HEADER.FIELDS (SUBJECT)", "HEADER.FIELDS.NOT (SUBJECT FROM)", "2.1.HEADER.FIELDS (X)", "0", "1.0"]
)  # fmt: skip
partials = st.sampled_from(["", "<0.1>", "<5.0>", "<100000.5>", "<0.4294967295>", "<4294967295.1>"])
simple_atts = st.sampled_from(
    ["FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822.HEADER", "ALL"]
)


@st.composite
def fetch_att(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(simple_atts)
    peek = draw(st.sampled_from(["BODY", "BODY.PEEK"]))
    return f"{peek}[{draw(sections)}]{draw(partials)}"


search_keys = st.recursive(
    st.sampled_from(
        [
            "ALL",
            "SEEN",
            "UNSEEN",
            "DELETED",
            "LARGER 10",
            "SMALLER 99999",
            "SUBJECT mp",
            "BODY inner",
            'TEXT ""',
            'HEADER Subject ""',
            "FROM x",
            "SINCE 1-Jan-2000",
            "SENTON 1-Jan-2025",
            "UID 1:*",
            "1:*",
            "KEYWORD $x",
            "NEW",
            "OLD",
            'CC ""',
        ]
    ),
    lambda inner: st.one_of(
        st.builds(lambda a: f"NOT {a}", inner),
        st.builds(lambda a, b: f"OR {a} {b}", inner, inner),
        st.builds(lambda xs: "(" + " ".join(xs) + ")", st.lists(inner, min_size=1, max_size=3)),
    ),
    max_leaves=6,
)
flags = st.lists(st.sampled_from(["\\Seen", "\\Deleted", "\\Flagged", "$Work", "\\Recent", "\\Draft"]), max_size=3)
names = st.sampled_from(["INBOX", "Other", "Nowhere", '"a b"', "&AMk-t&AOk-", "INBOX/sub", '""', "Other/%"])


@st.composite
def command(draw: st.DrawFn) -> str:
    uid = "UID " if draw(st.booleans()) else ""
    kind = draw(st.sampled_from(["FETCH", "STORE", "SEARCH", "COPY", "MOVE", "STATUS", "LIST", "EXPUNGE", "NOOP"]))
    if kind == "FETCH":
        atts = draw(st.lists(fetch_att(), min_size=1, max_size=4))
        return f"{uid}FETCH {draw(seqs)} ({' '.join(atts)})"
    if kind == "STORE":
        op = draw(st.sampled_from(["+FLAGS", "-FLAGS", "FLAGS", "+FLAGS.SILENT"]))
        return f"{uid}STORE {draw(seqs)} {op} ({' '.join(draw(flags))})"
    if kind == "SEARCH":
        charset = draw(st.sampled_from(["", "CHARSET UTF-8 ", "CHARSET US-ASCII "]))
        return f"{uid}SEARCH {charset}{draw(search_keys)}"
    if kind in ("COPY", "MOVE"):
        return f"{uid}{kind} {draw(seqs)} {draw(names)}"
    if kind == "STATUS":
        return f"STATUS {draw(names)} (MESSAGES UIDNEXT UNSEEN SIZE)"
    if kind == "LIST":
        return f'LIST "" {draw(names)}'
    if kind == "EXPUNGE":
        return f"UID EXPUNGE {draw(seqs)}" if uid else "CHECK"
    return "NOOP"


def run_session(server: RunningServer, lines: list[bytes]) -> list[bytes]:
    sock = socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=30)
    tls = server.tls.client_context().wrap_socket(sock, server_hostname="localhost")
    f = tls.makefile("rb")
    out = [f.readline()]
    tls.sendall(f'l LOGIN {BOB} "{BOB_PW}"\r\ns SELECT INBOX\r\n'.encode())
    tls.sendall(b"".join(lines) + b"z LOGOUT\r\n")
    while line := f.readline():
        out.append(line)
        if line.startswith(b"z "):
            break
    tls.close()
    return out


# A tag is any ASTRING-CHAR but "+" (RFC 3501 §9): printable ASCII without SP ( ) { % * " \\ and "+".
TAGGED_OR_UNTAGGED = re.compile(rb'(\* |\+ |[^\x00-\x20\x7f-\xff(){%*"\\\\+]+ (OK|NO|BAD) )')


def still_serves(server: RunningServer) -> None:
    conn = imaps(server)
    ok(conn.select("INBOX"))
    conn.logout()


@SETTINGS
@given(st.lists(command(), min_size=1, max_size=8))
def test_random_commands_each_get_one_tagged_answer(fuzz_server: RunningServer, commands: list[str]) -> None:
    lines = [f"c{i} {c}\r\n".encode() for i, c in enumerate(commands)]
    out = run_session(fuzz_server, lines)
    assert not any(b"Internal error" in line for line in out), out
    tagged = [line for line in out if re.match(rb"c\d+ ", line)]
    assert [t.split()[0] for t in tagged] == [b"c%d" % i for i in range(len(commands))], out
    assert all(t.split()[1] in (b"OK", b"NO", b"BAD") for t in tagged), out
    assert out[-1].startswith(b"z OK"), out
    still_serves(fuzz_server)


noise = st.lists(
    st.sampled_from(
        [
            b"a ",
            b"FETCH ",
            b"1:* ",
            b"(",
            b")",
            b"BODY[",
            b"]",
            b"<0.3>",
            b"{3+}\r\nabc",
            b"{2}\r\n",
            b'"x"',
            b"\\Seen ",
            b"SEARCH ",
            b"NOT ",
            b"OR ",
            b"UID ",
            b"STORE ",
            b"+FLAGS ",
            b"*",
            b"\r\n",
            b"\n",
            b"\x00",
            b"\xff",
            b"IDLE\r\n",
            b"DONE\r\n",
            b"APPEND INBOX ",
            b"~{3}\r\n",
            b"CHARSET ",
            b"UTF-8 ",
        ]
    ),
    max_size=60,
)


@SETTINGS
@given(noise)
def test_raw_noise_never_breaks_the_server(fuzz_server: RunningServer, tokens: list[bytes]) -> None:
    # What follows the noise flushes any open literal (they are small here), IDLE and AUTHENTICATE, then logs out.
    out = run_session(fuzz_server, [b"".join(tokens) + b"\r\n" + b"x" * 64 + b"\r\nDONE\r\n"])
    assert not any(b"Internal error" in line for line in out), out
    assert all(re.match(TAGGED_OR_UNTAGGED, line) for line in out), out
    still_serves(fuzz_server)
