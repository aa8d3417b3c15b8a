"""Sans-I/O SMTP framing: command lines and the DATA body.

Bytes go in, events come out; no sockets, so both are fuzzed directly
(tests/test_framing_props.py). The rules are strict on purpose:

* Only CRLF ends a line. A bare LF or bare CR anywhere is an error: it is the
  ambiguity that SMTP smuggling exploits (Postfix's
  `smtpd_forbid_bare_newline = reject`).
* Only CRLF.CRLF ends DATA (RFC 5321 §4.1.1.4), and dot-stuffing is undone
  (§4.5.2).
* Every line and the whole message have size bounds; past a bound the framer
  stops keeping data but keeps reading to the end of DATA, so the client gets
  a reply instead of a reset, and memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LineError(Enum):
    BARE_NEWLINE = "bare_newline"
    TOO_LONG = "line_too_long"


def check_command_line(line: bytes, limit: int) -> LineError | None:
    """Validate one command line as read up to and including its LF."""
    if len(line) > limit:
        return LineError.TOO_LONG
    if not line.endswith(b"\r\n"):
        return LineError.BARE_NEWLINE
    body = line[:-2]
    if b"\r" in body or b"\n" in body:
        return LineError.BARE_NEWLINE
    return None


class DataError(Enum):
    BARE_NEWLINE = "bare_newline"
    LINE_TOO_LONG = "line_too_long"
    TOO_BIG = "too_big"


@dataclass(frozen=True)
class BodyChunk:
    data: bytes  # unstuffed message bytes, CRLF line endings


@dataclass(frozen=True)
class EndOfData:
    error: DataError | None  # None: a well-formed message
    leftover: bytes  # bytes received after the terminator (pipelined commands)


DataEvent = BodyChunk | EndOfData


class DataFramer:
    """Turns the bytes after `354` into body chunks and one `EndOfData`.

    `feed()` takes any split of the stream. After `EndOfData` the framer is
    finished; `leftover` holds the bytes that followed the terminator.
    """

    def __init__(self, max_size: int, max_line: int) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0  # unstuffed bytes seen, counted even when discarding
        self.error: DataError | None = None
        self.done = False
        self._partial = bytearray()  # current incomplete line (bounded by max_line)
        self._partial_overflow = False

    def feed(self, data: bytes) -> list[DataEvent]:
        if self.done:
            raise RuntimeError("DataFramer fed after EndOfData")
        events: list[DataEvent] = []
        out = bytearray()
        pos = 0
        n = len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._add_partial(data[pos:])
                break
            piece = data[pos : nl + 1]
            pos = nl + 1
            if self._partial or self._partial_overflow:
                self._add_partial(piece)
                line = bytes(self._partial)
                overflow = self._partial_overflow
                self._partial.clear()
                self._partial_overflow = False
            else:
                line = piece
                overflow = len(line) > self.max_line
            if self._is_terminator(line):
                if line != b".\r\n":
                    # A sloppy terminator is itself a framing disagreement: whatever
                    # else went wrong, the session must not go on (smuggling).
                    self._fail(DataError.BARE_NEWLINE)
                if out and self.error is None:
                    events.append(BodyChunk(bytes(out)))
                self.done = True
                events.append(EndOfData(self.error, bytes(data[pos:])))
                return events
            if overflow:
                self._fail(DataError.LINE_TOO_LONG)
            elif not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                self._fail(DataError.BARE_NEWLINE)
            if line.startswith(b"."):
                line = line[1:]  # RFC 5321 §4.5.2 transparency
            self.size += len(line)
            if self.size > self.max_size:
                self._fail(DataError.TOO_BIG)
            if self.error is None:
                out += line
        if out and self.error is None:
            events.append(BodyChunk(bytes(out)))
        return events

    def _is_terminator(self, line: bytes) -> bool:
        if line == b".\r\n":
            return True
        # Once the stream is already refused, accept a sloppy terminator too,
        # so a client using bare LFs still gets its 5xx reply promptly.
        return self.error is not None and line.replace(b"\r", b"") == b".\n"

    def _add_partial(self, chunk: bytes) -> None:
        room = self.max_line - len(self._partial)
        if len(chunk) > room:
            self._partial += chunk[: max(room, 0)]
            self._partial_overflow = True
        else:
            self._partial += chunk

    def _fail(self, error: DataError) -> None:
        # A bare newline outranks a size error: it decides that the connection
        # closes, because nothing after it can be framed with certainty.
        if self.error is None or error is DataError.BARE_NEWLINE:
            self.error = error
