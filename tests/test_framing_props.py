"""Property tests for the sans-I/O SMTP framing (protocol/smtp_data.py) and reply
rendering (protocol/smtp_reply.py).

No sockets: bytes go in, events come out, and hypothesis picks the bytes and
where the stream is split between reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mailwarden.protocol.smtp_data import (
    BodyChunk,
    DataError,
    DataFramer,
    EndOfData,
    LineError,
    check_command_line,
)
from mailwarden.protocol.smtp_reply import clean_text, render_reply

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAX_LINE = 1000  # the smallest smtp.max_data_line the config allows
MAX_SIZE = 4096

# ---- helpers -----------------------------------------------------------------


def stuff(lines: list[bytes]) -> bytes:
    """What a correct client sends after 354: dot-stuffed CRLF lines and the terminator."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split data at the given offsets (any order, duplicates allowed: empty pieces are fed too)."""
    points = sorted(min(c, len(data)) for c in cuts)
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


@dataclass
class Run:
    """Everything a framer produced for one stream."""

    body: bytes  # concatenated BodyChunk data
    ends: list[EndOfData]
    rest: bytes  # leftover of the EndOfData plus the pieces never fed (what the command reader gets back)
    max_partial: int  # largest partial-line buffer seen after a feed

    @property
    def end(self) -> EndOfData | None:
        return self.ends[0] if self.ends else None


def run(pieces: list[bytes], max_size: int = MAX_SIZE, max_line: int = MAX_LINE) -> Run:
    """Feed the pieces until EndOfData, as the endpoint does; checks invariants on the way."""
    framer = DataFramer(max_size, max_line)
    body = bytearray()
    ends: list[EndOfData] = []
    rest = b""
    max_partial = 0
    for i, piece in enumerate(pieces):
        for ev in framer.feed(piece):
            assert not ends, "an event after EndOfData"
            if isinstance(ev, BodyChunk):
                assert ev.data, "empty BodyChunk"
                body += ev.data
            else:
                assert isinstance(ev, EndOfData)
                ends.append(ev)
        max_partial = max(max_partial, len(framer._partial))
        assert len(framer._partial) <= max_line + 1, "partial-line buffer exceeded its bound"
        if framer.done:
            assert ends
            rest = ends[0].leftover + b"".join(pieces[i + 1 :])
            with pytest.raises(RuntimeError):
                framer.feed(b"x")
            break
    return Run(bytes(body), ends, rest, max_partial)


# Text lines as the message author wrote them: any bytes but CR and LF.
line_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
dotty_line = st.one_of(line_bytes, line_bytes.map(lambda b: b"." + b), st.sampled_from([b"", b".", b"..", b". "]))
cuts = st.lists(st.integers(min_value=0, max_value=5000), max_size=12)
trailing = st.binary(max_size=40)

# ---- DataFramer: round trip --------------------------------------------------


@PROPS
@given(lines=st.lists(dotty_line, max_size=30), cut=cuts, after=trailing)
@example(lines=[b".", b"..", b""], cut=[1, 2, 3], after=b"QUIT\r\n")
@example(lines=[b"."], cut=[0, 0, 1], after=b"")
def test_round_trip_any_split(lines: list[bytes], cut: list[int], after: bytes) -> None:
    stream = stuff(lines) + after
    r = run(split_at(stream, cut))
    assert r.body == b"".join(line + b"\r\n" for line in lines)
    assert len(r.ends) == 1
    assert r.end is not None and r.end.error is None
    assert r.rest == after


def test_round_trip_concrete_dot_stuffing() -> None:
    framer = DataFramer(MAX_SIZE, MAX_LINE)
    events = framer.feed(b"Subject: x\r\n\r\n..leading dot\r\n...\r\n.\r\nMAIL FROM:<a@b>\r\n")
    assert events == [
        BodyChunk(b"Subject: x\r\n\r\n.leading dot\r\n..\r\n"),
        EndOfData(None, b"MAIL FROM:<a@b>\r\n"),
    ]


def test_empty_message_and_byte_at_a_time() -> None:
    assert DataFramer(MAX_SIZE, MAX_LINE).feed(b".\r\n") == [EndOfData(None, b"")]
    stream = b"a\r\n.b\r\n..\r\n.\r\nNOOP\r\n"
    r = run([stream[i : i + 1] for i in range(len(stream))])
    assert r.body == b"a\r\nb\r\n.\r\n"
    # byte at a time: the terminator is recognised on the byte that completes it,
    # and what follows comes back to the command reader untouched
    assert r.end == EndOfData(None, b"")
    assert r.rest == b"NOOP\r\n"


# ---- DataFramer: arbitrary bytes ---------------------------------------------

# Bytes rich in the characters that matter to the framer.
framing_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\r", b"\n", b"\r\n", b".", b".\r\n", b"\r\n.\r\n", b"\n.\r\n", b"\r\n.\n", b"x"]),
        st.binary(max_size=30),
    ),
    max_size=60,
).map(b"".join)


@PROPS
@given(data=framing_bytes, cut=cuts, max_size=st.integers(1, 300), max_line=st.integers(3, 80))
def test_arbitrary_bytes_never_raise_and_stay_bounded(
    data: bytes, cut: list[int], max_size: int, max_line: int
) -> None:
    r = run(split_at(data, cut), max_size=max_size, max_line=max_line)
    assert len(r.body) <= max_size
    assert len(r.ends) <= 1
    if r.end is not None and r.end.error is None:
        # a clean message is a sequence of CRLF lines without bare CR/LF
        assert r.body == b"" or r.body.endswith(b"\r\n")
        assert b"\r" not in r.body.replace(b"\r\n", b"") and b"\n" not in r.body.replace(b"\r\n", b"")


@PROPS
@given(data=framing_bytes, cut=cuts, max_size=st.integers(1, 300), max_line=st.integers(3, 80))
def test_result_does_not_depend_on_the_split(data: bytes, cut: list[int], max_size: int, max_line: int) -> None:
    # Lines of exactly max_line + 1 bytes: see test_line_one_past_the_bound_is_refused_however_it_is_split.
    assume(no_line_of_length(data, max_line + 1))
    whole = run([data], max_size=max_size, max_line=max_line)
    pieces = run(split_at(data, cut), max_size=max_size, max_line=max_line)
    assert (pieces.end and pieces.end.error, pieces.rest) == (whole.end and whole.end.error, whole.rest)
    if whole.end is not None and whole.end.error is None:
        assert pieces.body == whole.body


def model(data: bytes, max_size: int, max_line: int) -> tuple[bytes, EndOfData | None]:
    """A line-at-a-time reference reading of the whole stream: (body kept, end)."""
    body = bytearray()
    error: DataError | None = None
    size = 0
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return bytes(body), None
        line = data[pos : nl + 1]
        pos = nl + 1
        if line == b".\r\n" or (error is not None and line.replace(b"\r", b"") == b".\n"):
            return bytes(body), EndOfData(error, data[pos:])
        if len(line) > max_line:
            error = error or DataError.LINE_TOO_LONG
        elif not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            error = error or DataError.BARE_NEWLINE
        if line.startswith(b"."):
            line = line[1:]
        size += len(line)
        if size > max_size:
            error = error or DataError.TOO_BIG
        if error is None:
            body += line


def no_line_of_length(data: bytes, n: int) -> bool:
    return all(len(seg) + 1 != n for seg in data.split(b"\n")[:-1])


@PROPS
@given(data=framing_bytes, cut=cuts, max_size=st.integers(1, 300), max_line=st.integers(3, 80))
def test_framer_agrees_with_a_line_at_a_time_model(data: bytes, cut: list[int], max_size: int, max_line: int) -> None:
    # Lines of exactly max_line + 1 bytes: see test_line_one_past_the_bound_is_refused_however_it_is_split.
    assume(no_line_of_length(data, max_line + 1))
    body, end = model(data, max_size, max_line)
    r = run(split_at(data, cut), max_size=max_size, max_line=max_line)
    assert (r.end is None) == (end is None)
    if end is not None:
        # Which error wins when several apply is left to the dedicated tests
        # (test_smuggling_after_another_error_still_counts_as_bare_newline).
        assert r.end is not None and (r.end.error is None) == (end.error is None)
        assert r.rest == end.leftover
    if end is not None and end.error is None:
        assert r.body == body
    else:
        # no body past an error (or while the end is still to come): only a prefix of the good lines
        assert body.startswith(r.body)


@PROPS
@given(data=framing_bytes, cut=cuts)
def test_no_body_chunk_once_the_framer_has_an_error(data: bytes, cut: list[int]) -> None:
    framer = DataFramer(200, 40)
    for piece in split_at(data, cut):
        if framer.done:
            break
        had_error = framer.error is not None
        events = framer.feed(piece)
        if had_error:
            assert not any(isinstance(e, BodyChunk) for e in events), "BodyChunk after the error"


# ---- DataFramer: bare CR / LF and SMTP smuggling -------------------------------

SMUGGLE = [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\n", b"\r\n.\r", b"\r.\n"]
SMUGGLED = b"MAIL FROM:<x@y>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nhi\r\n.\r\n"


@PROPS
@given(
    before=st.lists(line_bytes, max_size=5),
    seq=st.sampled_from(SMUGGLE),
    prefix=line_bytes,
    cut=cuts,
)
def test_smuggling_sequences_never_end_a_clean_message(
    before: list[bytes], seq: bytes, prefix: bytes, cut: list[int]
) -> None:
    head = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in before)
    stream = head + b"X" + prefix + seq + SMUGGLED + b".\r\n"
    r = run(split_at(stream, cut))
    assert len(r.ends) == 1
    assert r.end is not None
    assert r.end.error is DataError.BARE_NEWLINE
    # and nothing from the bad line on is handed out as body
    assert b"smuggled" not in r.body


@pytest.mark.parametrize("seq", [b"\n.\r\n", b"\r\n.\n", b"\n.\n"])
@pytest.mark.parametrize("pre", [b"a" * (MAX_LINE + 200) + b"\r\n", (b"b" * 78 + b"\r\n") * 60], ids=["long", "big"])
def test_smuggling_after_another_error_still_counts_as_bare_newline(pre: bytes, seq: bytes) -> None:
    """A message already refused for size must not let a bare-LF terminator end DATA
    with a *different* error: the endpoint keeps the session open after 552/554
    and would run the smuggled commands that follow as the next transaction."""
    r = run([pre + b"X" + seq + SMUGGLED + b".\r\n"])
    assert r.end is not None
    assert r.end.error is DataError.BARE_NEWLINE or b"MAIL FROM" not in r.rest


@pytest.mark.parametrize("seq", SMUGGLE)
def test_smuggling_concrete(seq: bytes) -> None:
    framer = DataFramer(MAX_SIZE, MAX_LINE)
    events = framer.feed(b"Subject: a\r\n\r\nbody" + seq + SMUGGLED)
    ends = [e for e in events if isinstance(e, EndOfData)]
    if ends:
        assert ends[0].error is DataError.BARE_NEWLINE
    assert not any(isinstance(e, BodyChunk) and b"smuggled" in e.data for e in events)


@PROPS
@given(
    lines=st.lists(line_bytes, min_size=1, max_size=5),
    where=st.integers(0, 4),
    bad=st.sampled_from([b"\n", b"\r"]),
    pos=st.integers(0, 60),
    cut=cuts,
)
def test_any_bare_cr_or_lf_refuses_the_message(
    lines: list[bytes], where: int, bad: bytes, pos: int, cut: list[int]
) -> None:
    lines = [b"x" + line for line in lines]  # never a lone "." line
    i = where % len(lines)
    p = min(pos, len(lines[i]))
    lines[i] = lines[i][:p] + bad + lines[i][p:]
    r = run(split_at(stuff(lines), cut))
    assert r.end is None or r.end.error is DataError.BARE_NEWLINE


# ---- DataFramer: size bounds ---------------------------------------------------


@PROPS
@given(extra=st.integers(2, 3000), cut=cuts)
def test_line_too_long(extra: int, cut: list[int]) -> None:
    # extra=1 (a line of max_line + 1 bytes) is the off-by-one in the next tests
    long_line = b"y" * (MAX_LINE - 2 + extra) + b"\r\n"
    stream = b"ok\r\n" + long_line + b"after\r\n.\r\nQUIT\r\n"
    r = run(split_at(stream, cut))
    assert r.end is not None and r.end.error is DataError.LINE_TOO_LONG
    assert r.rest == b"QUIT\r\n"
    assert b"y" * (MAX_LINE + 1) not in r.body and b"after" not in r.body
    assert r.max_partial <= MAX_LINE + 1


@PROPS
@given(cut=cuts)
def test_line_of_exactly_max_line_is_accepted(cut: list[int]) -> None:
    fits = b"z" * (MAX_LINE - 2) + b"\r\n"  # max_line bytes, CRLF included
    stuffed = b"." + b"z" * (MAX_LINE - 3) + b"\r\n"  # max_line bytes on the wire, the dot included
    r = run(split_at(fits + stuffed + b".\r\n", cut))
    assert r.end is not None and r.end.error is None and r.body == fits + stuffed[1:]


def test_line_one_past_the_bound_is_refused_in_one_piece() -> None:
    too_long = b"z" * (MAX_LINE - 1) + b"\r\n"  # max_line + 1 bytes
    r = run([too_long + b".\r\n"])
    assert r.end is not None and r.end.error is DataError.LINE_TOO_LONG


@pytest.mark.parametrize("at", [1, 10, MAX_LINE - 1, MAX_LINE])
def test_line_one_past_the_bound_is_refused_however_it_is_split(at: int) -> None:
    too_long = b"z" * (MAX_LINE - 1) + b"\r\n"  # max_line + 1 bytes
    stream = too_long + b".\r\n"
    r = run([stream[:at], stream[at:]])
    assert r.end is not None and r.end.error is DataError.LINE_TOO_LONG


@PROPS
@given(size=st.integers(MAX_SIZE + 1, 3 * MAX_SIZE), cut=cuts)
def test_too_big(size: int, cut: list[int]) -> None:
    lines = [b"w" * 78] * (size // 80 + 1)
    stream = stuff(lines) + b"RSET\r\n"
    r = run(split_at(stream, cut))
    assert r.end is not None and r.end.error is DataError.TOO_BIG
    assert r.rest == b"RSET\r\n"
    assert len(r.body) <= MAX_SIZE


def test_memory_bounded_for_a_megabyte_without_newline() -> None:
    framer = DataFramer(MAX_SIZE, MAX_LINE)
    for _ in range(64):
        assert framer.feed(b"q" * 16384) == []
        assert len(framer._partial) <= MAX_LINE + 1
    assert framer.feed(b"\r\n.\r\n") == [EndOfData(DataError.LINE_TOO_LONG, b"")]


# ---- check_command_line ----------------------------------------------------------

command_text = st.binary(max_size=80)


@PROPS
@given(text=command_text, limit=st.integers(4, 100))
def test_command_line_accepts_exactly_crlf_terminated_bounded_lines(text: bytes, limit: int) -> None:
    line = text + b"\r\n"
    result = check_command_line(line, limit)
    if len(line) > limit:
        assert result is LineError.TOO_LONG
    elif b"\r" in text or b"\n" in text:
        assert result is LineError.BARE_NEWLINE
    else:
        assert result is None


@PROPS
@given(text=command_text.filter(lambda b: b"\r" not in b and b"\n" not in b), ending=st.sampled_from([b"\n", b"\r"]))
def test_command_line_without_crlf_is_refused(text: bytes, ending: bytes) -> None:
    assert check_command_line(text + ending, 10_000) is LineError.BARE_NEWLINE
    assert check_command_line(text + b"\r\r\n", 10_000) is LineError.BARE_NEWLINE
    assert check_command_line(text + b"\n\r\n", 10_000) is LineError.BARE_NEWLINE


@PROPS
@given(text=command_text, limit=st.integers(0, 200))
def test_command_line_accepted_lines_are_within_the_limit(text: bytes, limit: int) -> None:
    if check_command_line(text, limit) is None:
        assert len(text) <= limit
        assert text.endswith(b"\r\n") and text.count(b"\r") == 1 and text.count(b"\n") == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"NOOP\r\n", None),
        (b"NOOP\n", LineError.BARE_NEWLINE),
        (b"NO\rOP\r\n", LineError.BARE_NEWLINE),
        (b"NOOP\r", LineError.BARE_NEWLINE),
        (b"x" * 2047 + b"\r\n", LineError.TOO_LONG),
        (b"x" * 2046 + b"\r\n", None),
    ],
)
def test_command_line_examples(line: bytes, expected: LineError | None) -> None:
    assert check_command_line(line, 2048) is expected


# ---- render_reply / clean_text ----------------------------------------------------------

UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
codes = st.sampled_from(["250", "221", "354", "220", "421", "452", "500", "501", "502", "550", "554", "599", "334"])


@PROPS
@given(text=st.text(max_size=300), limit=st.integers(1, 300))
def test_clean_text_never_has_control_chars(text: str, limit: int) -> None:
    out = clean_text(text, limit)
    assert not UNSAFE.search(out)
    assert len(out) <= limit + 3


@PROPS
@given(code=codes, sep=st.sampled_from([" ", "-", "", "\r\n"]), text=st.text(max_size=200), ehlo=st.booleans())
def test_render_reply_never_has_control_chars(code: str, sep: str, text: str, ehlo: bool) -> None:
    out = render_reply(code + sep + text, ehlo=ehlo)
    assert not UNSAFE.search(out)


@PROPS
@given(status=st.text(max_size=200))
def test_render_reply_any_text_is_single_safe_line(status: str) -> None:
    out = render_reply(status)
    assert "\r" not in out and "\n" not in out and not UNSAFE.search(out)


ENHANCED_CODES = ["250", "221", "421", "452", "500", "501", "502", "503", "550", "552", "554", "451", "235"]


@PROPS
@given(code=st.sampled_from(ENHANCED_CODES), text=st.text(max_size=80))
def test_render_reply_adds_an_enhanced_code_that_matches_the_class(code: str, text: str) -> None:
    assume(not re.match(r"^[245]\.\d{1,3}\.\d{1,3}( |$)", text))  # text that brings its own code keeps it
    out = render_reply(f"{code} {text}")
    assert re.match(rf"^{code} {code[0]}\.\d{{1,3}}\.\d{{1,3}}( |$)", out), out


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
        ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
        ("501 Syntax: NOOP", "501 5.5.4 Syntax: NOOP"),
        ("250", "250 2.0.0"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("220 mail.example.test ESMTP", "220 mail.example.test ESMTP"),
        ("250-PIPELINING", "250-PIPELINING"),
        ("250 OK\r\n250 smuggled", "250 2.0.0 OK??250 smuggled"),
        ("550 no\x1b[31mred\x07", "550 5.0.0 no?[31mred?"),
    ],
)
def test_render_reply_examples(status: str, expected: str) -> None:
    assert render_reply(status) == expected
