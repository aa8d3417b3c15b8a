"""Sans-I/O IMAP4rev1 command parser (RFC 3501 with LITERAL+/LITERAL- RFC 7888).

Bytes go in, events (commands.py) come out; no sockets, so hypothesis drives it
directly (tests/test_imap_protocol.py). It works in two stages:

1. Framing. A command is lines joined by literals: `a LOGIN {4}\\r\\nuser pass\\r\\n`.
   The framer reads one line at a time (never more than `max_line` octets kept); a
   line ending in a literal announcement `{n}` / `{n+}` is judged before any
   octet of the literal is read: over its limit, a synchronizing literal gets
   `NO [TOOBIG]` instead of `+`, a non-synchronizing one gets `BAD [TOOBIG]` and
   its n octets are counted off and dropped as they arrive (never kept). Only
   CRLF ends a line; a bare CR or LF refuses the line.
2. Grammar. A complete command (at most `max_command` octets, literals
   included) is parsed by recursive descent into a `Command` with typed
   arguments, with bounded nesting (`max_depth`) and item count (`max_args`).

Every error produces one `Bad`/`TooBig` event and the parser carries on with
the next line. Memory held between calls: the current line (<= max_line), the
command assembled so far (<= max_command) and a 32-octet tail while skipping.

Modes: after `IDLE` the parser expects the `DONE` line (-> `IdleDone`); after
`AUTHENTICATE` every line is a `ContinuationLine` until the endpoint calls
`end_authenticate()`. If the endpoint refuses IDLE or AUTHENTICATE at once it
calls `end_idle()` / `end_authenticate()` (the client waits for `+` before
sending anything, so no bytes are misread). After STARTTLS the endpoint drops
the events that followed and calls `reset()` (RFC 3501 §6.2.1 / RFC 2595).
"""

from __future__ import annotations

import binascii
import datetime
import re

from mailwarden.protocol.imap.commands import (
    UID_COMMANDS,
    Bad,
    Command,
    ContinuationLine,
    Event,
    FetchAtt,
    IdleDone,
    NeedContinuation,
    SearchKey,
    Section,
    SequenceSet,
    StoreAction,
    TooBig,
)

# ---- character classes (RFC 3501 §9) ------------------------------------------------------------------------------

_CTL = frozenset(range(0x20)) | {0x7F}
ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | _CTL
ATOM_CHARS = frozenset(c for c in range(0x01, 0x80) if c not in ATOM_SPECIALS)
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
LIST_CHARS = ATOM_CHARS | frozenset(b"%*]")
TAG_CHARS = ASTRING_CHARS - {ord("+")}
_DIGITS = frozenset(b"0123456789")
_QUOTED_OK = frozenset(c for c in range(0x01, 0x80) if c not in (0x0A, 0x0D, 0x22, 0x5C))

MAX_NUMBER = 0xFFFFFFFF  # number = 1*DIGIT, "unsigned 32-bit integer"
LITERAL_MINUS_MAX = 4096  # RFC 7888 §4: the largest non-synchronizing literal under LITERAL-
MiB = 1024 * 1024

_MARKER = re.compile(rb"(~?)\{([0-9]+)(\+?)\}\r\n\Z")
_TAIL = 32  # octets kept while skipping a line: enough for "~{4294967295+}\r\n"

_MONTHS = {m: i + 1 for i, m in enumerate(b"JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}

_FLAG_ONLY_KEYS = frozenset(
    [
        "ALL",
        "ANSWERED",
        "DELETED",
        "DRAFT",
        "FLAGGED",
        "NEW",
        "OLD",
        "RECENT",
        "SEEN",
        "UNANSWERED",
        "UNDELETED",
        "UNDRAFT",
        "UNFLAGGED",
        "UNSEEN",
    ]
)
_STRING_KEYS = frozenset(["BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"])
_DATE_KEYS = frozenset(["BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"])
_STATUS_ITEMS = frozenset(["MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "SIZE", "DELETED"])
_SIMPLE_FETCH = frozenset(
    [
        "FLAGS",
        "INTERNALDATE",
        "RFC822.SIZE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.TEXT",
        "ENVELOPE",
        "BODY",
        "BODYSTRUCTURE",
        "UID",
    ]
)
_FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_NO_ARGS = frozenset(["CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "NAMESPACE", "IDLE"])
_ONE_MAILBOX = frozenset(["SELECT", "EXAMINE", "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "GETQUOTAROOT"])
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")

# states of the framer
_LINE, _LITERAL, _DISCARD, _SKIP = range(4)
# modes
_COMMAND, _IDLE, _SASL = range(3)


class _SyntaxError(Exception):
    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


def _head(line: bytes) -> tuple[str | None, str | None]:
    """The tag and the command name (UID prefix skipped) at the start of a command's first line."""
    i = 0
    n = len(line)
    while i < n and line[i] in TAG_CHARS:
        i += 1
    if i == 0 or i == n or line[i] not in (0x20, 0x0D):
        return None, None
    tag = line[:i].decode("ascii")
    words = line[i + 1 : i + 40].split(b" ", 2)
    name = words[0].rstrip(b"\r\n").upper()
    if name == b"UID" and len(words) > 1:
        name = words[1].rstrip(b"\r\n").upper()
    try:
        return tag, name.decode("ascii")
    except UnicodeDecodeError:
        return tag, None


class CommandParser:
    """Turns the bytes a client sends into `Event`s. `feed()` takes any split of the stream.

    Limits (all in octets unless said otherwise):
      max_line          one line of a command, CRLF included, literals excluded
      max_literal       one literal of APPEND (the message); the endpoint may lower it before authentication
      max_small_literal one literal of any other command (default: max_line)
      max_command       one whole command, lines and literals (default: 2 * max_literal)
      max_depth         nesting of parenthesised lists and of NOT/OR search keys
      max_args          values in one command (list elements, search keys, fetch items...)
      literal_plus      True: LITERAL+ ({n+} up to the literal limit); False: LITERAL- ({n+} up to 4096)
    """

    def __init__(
        self,
        max_line: int = 8192,
        max_literal: int = 50 * MiB,
        max_depth: int = 16,
        literal_plus: bool = True,
        *,
        max_small_literal: int | None = None,
        max_command: int | None = None,
        max_args: int = 1000,
    ) -> None:
        if max_line < 64:
            raise ValueError("max_line must be at least 64")
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_small_literal = max_line if max_small_literal is None else max_small_literal
        self.max_command = 2 * max_literal if max_command is None else max_command
        self.max_depth = max_depth
        self.max_args = max_args
        self.literal_plus = literal_plus
        self.reset()

    # ---- public ---------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything buffered (after STARTTLS: plaintext pipelined before the handshake is dropped)."""
        self._state = _LINE
        self._mode = _COMMAND
        self._mode_tag = ""
        self._line = bytearray()
        self._cmd = bytearray()
        self._tag: str | None = None
        self._name: str | None = None
        self._remaining = 0
        self._tail = b""

    def end_idle(self) -> None:
        """The endpoint refused IDLE: read commands again."""
        if self._mode == _IDLE:
            self._mode = _COMMAND

    def end_authenticate(self) -> None:
        """The SASL exchange is over (success, failure or refusal): read commands again."""
        if self._mode == _SASL:
            self._mode = _COMMAND

    @property
    def idling(self) -> bool:
        return self._mode == _IDLE

    @property
    def authenticating(self) -> bool:
        return self._mode == _SASL

    def buffered(self) -> int:
        """Octets held between calls (what the memory bound is about)."""
        return len(self._line) + len(self._cmd) + len(self._tail)

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == _LITERAL:
                take = min(self._remaining, n - pos)
                self._cmd += data[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _LINE
            elif state == _DISCARD:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _SKIP
                    self._tail = b""
            elif state == _SKIP:
                lf = data.find(b"\n", pos)
                end = n if lf < 0 else lf + 1
                self._tail = (self._tail + data[max(pos, end - _TAIL) : end])[-_TAIL:]
                pos = end
                if lf >= 0:
                    self._end_skip()
            else:
                lf = data.find(b"\n", pos)
                end = n if lf < 0 else lf + 1
                if len(self._line) + (end - pos) > self.max_line:
                    events.append(self._line_too_long(data[pos : pos + 200]))
                    self._tail = bytes(self._line[-_TAIL:])
                    self._line.clear()
                    self._state = _SKIP
                    continue  # the skip state reads from pos
                self._line += data[pos:end]
                pos = end
                if lf >= 0:
                    line = bytes(self._line)
                    self._line.clear()
                    self._on_line(line, events)
        return events

    # ---- framing --------------------------------------------------------------------------------------------------

    def _line_too_long(self, more: bytes) -> Bad:
        if self._mode != _COMMAND:
            tag: str | None = self._mode_tag
            self._mode = _COMMAND
        else:
            # The same tag whichever way the stream was split: look at the line's first 200 octets.
            tag = self._tag if self._cmd else _head((bytes(self._line[:200]) + more)[:200])[0]
        self._abort_command()
        return Bad(tag, "line too long", "LIMIT")

    def _abort_command(self) -> None:
        self._cmd.clear()
        self._tag = self._name = None

    def _end_skip(self) -> None:
        """The line being skipped ended: if it announced a non-synchronizing literal, skip that too."""
        m = _MARKER.search(self._tail)
        self._tail = b""
        if m and m.group(3) and len(m.group(2)) <= 10 and int(m.group(2)) <= MAX_NUMBER:
            self._remaining = int(m.group(2))
            self._state = _DISCARD if self._remaining else _SKIP
        else:
            self._state = _LINE

    def _on_line(self, line: bytes, events: list[Event]) -> None:
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
            tag = self._mode_tag if self._mode != _COMMAND else (self._tag if self._cmd else _head(line)[0])
            self._mode = _COMMAND
            self._abort_command()
            events.append(Bad(tag, "line not ended by CRLF"))
            return
        if self._mode == _IDLE:
            self._mode = _COMMAND
            if line[:-2].upper() == b"DONE":
                events.append(IdleDone(self._mode_tag))
            else:
                events.append(Bad(self._mode_tag, "expected DONE"))
            return
        if self._mode == _SASL:
            events.append(ContinuationLine(self._mode_tag, line[:-2]))
            return
        if not self._cmd:
            self._tag, self._name = _head(line)
        if len(self._cmd) + len(line) > self.max_command:
            events.append(TooBig(self._tag, "command too large", "LIMIT", status="BAD"))
            self._abort_command()
            self._tail = line[-_TAIL:]
            self._end_skip()
            return
        self._cmd += line
        m = _MARKER.search(line)
        if m:
            self._on_literal(m, events)
            return
        buf = bytes(self._cmd)
        self._abort_command()
        event = self.parse_command(buf)
        events.append(event)
        if isinstance(event, Command):
            if event.name == "IDLE":
                self._mode, self._mode_tag = _IDLE, event.tag
            elif event.name == "AUTHENTICATE":
                self._mode, self._mode_tag = _SASL, event.tag
        return

    def _on_literal(self, m: re.Match, events: list[Event]) -> None:
        eight, digits, plus = m.groups()
        nonsync = bool(plus)
        tag = self._tag
        if len(digits) > 10 or int(digits) > MAX_NUMBER:
            # Not a number IMAP allows: we cannot know what the client will send next.
            self._abort_command()
            events.append(Bad(tag, "literal size out of range", close=True))
            self._state = _LINE
            return
        size = int(digits)
        limit = self.max_literal if self._name == "APPEND" else self.max_small_literal
        refusal: Bad | None = None
        if eight:
            refusal = Bad(tag, "literal8 is not supported", "CANNOT")
        elif nonsync and not self.literal_plus and size > LITERAL_MINUS_MAX:
            refusal = TooBig(tag, "non-synchronizing literal over 4096 octets (LITERAL-)", status="BAD")
        elif size > limit:
            refusal = TooBig(tag, f"literal over {limit} octets", status="BAD" if nonsync else "NO")
        elif len(self._cmd) + size > self.max_command:
            refusal = TooBig(tag, "command too large", status="BAD" if nonsync else "NO")
        if refusal is not None:
            events.append(refusal)
            self._abort_command()
            if nonsync:
                self._remaining = size
                self._state = _DISCARD if size else _SKIP
            return
        if not nonsync:
            events.append(NeedContinuation(tag, size))
        if size:
            self._remaining = size
            self._state = _LITERAL

    # ---- grammar --------------------------------------------------------------------------------------------------

    def parse_command(self, buf: bytes) -> Command | Bad:
        """Parse one complete command (its lines and literals, ending in CRLF)."""
        tag, _ = _head(buf)
        if tag is None:
            return Bad(None, "missing or invalid tag")
        r = _Reader(buf, self.max_depth, self.max_args)
        try:
            r.pos = len(tag)
            r.sp()
            name = r.atom().upper().decode("ascii")
            uid = False
            if name == "UID":
                r.sp()
                name = r.atom().upper().decode("ascii")
                if name not in UID_COMMANDS:
                    raise _SyntaxError(f"UID {name} is not a command")
                uid = True
            handler = _HANDLERS.get(name)
            if handler is None:
                return Bad(tag, "unknown command")
            args = handler(r, uid)
            r.end()
            return Command(tag, name, args, uid)
        except _SyntaxError as e:
            return Bad(tag, e.text, e.code)
        except RecursionError:
            return Bad(tag, "nested too deeply", "LIMIT")


class _Reader:
    """A cursor over one complete command. Every method raises _SyntaxError on a mismatch."""

    __slots__ = ("buf", "depth", "items", "max_depth", "max_items", "pos")

    def __init__(self, buf: bytes, max_depth: int, max_items: int) -> None:
        self.buf = buf
        self.pos = 0
        self.depth = 0
        self.items = 0
        self.max_depth = max_depth
        self.max_items = max_items

    # primitives

    def peek(self) -> int:
        return self.buf[self.pos] if self.pos < len(self.buf) else -1

    def at(self, word: bytes) -> bool:
        """Is `word` (case-insensitive) next?"""
        return self.buf[self.pos : self.pos + len(word)].upper() == word

    def expect(self, word: bytes, what: str | None = None) -> None:
        if not self.at(word):
            raise _SyntaxError(f"expected {what or word.decode()}")
        self.pos += len(word)

    def sp(self) -> None:
        self.expect(b" ", "a space")

    def end(self) -> None:
        if self.buf[self.pos :] != b"\r\n":
            raise _SyntaxError("unexpected data at the end of the command")

    def item(self) -> None:
        self.items += 1
        if self.items > self.max_items:
            raise _SyntaxError("too many arguments", "LIMIT")

    def open(self) -> None:
        self.expect(b"(")
        self.descend()

    def close(self) -> None:
        self.expect(b")")
        self.depth -= 1

    def descend(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise _SyntaxError("nested too deeply", "LIMIT")

    def take(self, chars: frozenset[int]) -> bytes:
        buf = self.buf
        start = i = self.pos
        n = len(buf)
        while i < n and buf[i] in chars:
            i += 1
        self.pos = i
        return buf[start:i]

    def atom(self, chars: frozenset[int] = ATOM_CHARS, what: str = "an atom") -> bytes:
        value = self.take(chars)
        if not value:
            raise _SyntaxError(f"expected {what}")
        return value

    def number(self, nonzero: bool = False) -> int:
        digits = self.take(_DIGITS)
        if not digits or len(digits) > 10 or int(digits) > MAX_NUMBER:
            raise _SyntaxError("expected a number")
        value = int(digits)
        if nonzero and value == 0:
            raise _SyntaxError("expected a non-zero number")
        return value

    # strings

    def quoted(self) -> bytes:
        self.expect(b'"')
        buf = self.buf
        out = bytearray()
        i = self.pos
        n = len(buf)
        while i < n:
            c = buf[i]
            if c == 0x22:
                self.pos = i + 1
                return bytes(out)
            if c == 0x5C:
                if i + 1 < n and buf[i + 1] in (0x22, 0x5C):
                    out.append(buf[i + 1])
                    i += 2
                    continue
                raise _SyntaxError("invalid escape in quoted string")
            if c not in _QUOTED_OK:
                raise _SyntaxError("invalid character in quoted string")
            out.append(c)
            i += 1
        raise _SyntaxError("unterminated quoted string")

    def at_literal(self) -> bool:
        """A literal is next: "{", or "~{" (literal8, refused by literal())."""
        return self.peek() == 0x7B or self.at(b"~{")

    def literal(self) -> bytes:
        if self.peek() == 0x7E:
            raise _SyntaxError("literal8 is not supported", "CANNOT")
        self.expect(b"{")
        size = self.number()
        if self.peek() == 0x2B:
            self.pos += 1
        self.expect(b"}\r\n", "a literal")
        end = self.pos + size
        if end > len(self.buf):
            raise _SyntaxError("truncated literal")
        value = self.buf[self.pos : end]
        if b"\x00" in value:
            raise _SyntaxError("NUL in literal")
        self.pos = end
        return value

    def string(self) -> bytes:
        if self.peek() == 0x22:
            return self.quoted()
        if self.at_literal():
            return self.literal()
        raise _SyntaxError("expected a string")

    def astring(self) -> bytes:
        if self.peek() == 0x22 or self.at_literal():
            return self.string()
        return self.atom(ASTRING_CHARS, "an astring")

    def nstring(self) -> bytes | None:
        if self.at(b"NIL") and self.buf[self.pos + 3 : self.pos + 4] not in ATOM_CHARS_BYTES:
            self.pos += 3
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        if self.peek() == 0x22 or self.at_literal():
            return self.string()
        return self.atom(LIST_CHARS, "a mailbox pattern")

    def text_atom(self) -> str:
        return self.atom().decode("ascii")

    # IMAP values

    def seq_number(self) -> int | None:
        if self.peek() == 0x2A:
            self.pos += 1
            return None
        return self.number(nonzero=True)

    def sequence_set(self) -> SequenceSet:
        ranges = []
        while True:
            lo = self.seq_number()
            hi = lo
            if self.peek() == 0x3A:
                self.pos += 1
                hi = self.seq_number()
            ranges.append((lo, hi))
            if self.peek() != 0x2C:
                return SequenceSet(tuple(ranges))
            self.pos += 1

    def flag(self) -> str:
        if self.peek() == 0x5C:
            self.pos += 1
            return "\\" + self.text_atom()
        return self.text_atom()

    def flag_list(self) -> tuple[str, ...]:
        self.open()
        flags = []
        if self.peek() != 0x29:
            while True:
                self.item()
                flags.append(self.flag())
                if self.peek() != 0x20:
                    break
                self.pos += 1
        self.close()
        return tuple(flags)

    def atom_list(self, allow_empty: bool = True) -> tuple[str, ...]:
        self.open()
        out = []
        if self.peek() != 0x29 or not allow_empty:
            while True:
                self.item()
                out.append(self.text_atom().upper())
                if self.peek() != 0x20:
                    break
                self.pos += 1
        self.close()
        return tuple(out)

    def date(self) -> datetime.date:
        quoted = self.peek() == 0x22
        if quoted:
            self.pos += 1
        day = self.take(_DIGITS)
        if not 1 <= len(day) <= 2:
            raise _SyntaxError("expected a date")
        self.expect(b"-", "a date")
        month = _MONTHS.get(self.buf[self.pos : self.pos + 3].upper())
        if month is None:
            raise _SyntaxError("expected a month")
        self.pos += 3
        self.expect(b"-", "a date")
        year = self.take(_DIGITS)
        if len(year) != 4:
            raise _SyntaxError("expected a year")
        if quoted:
            self.expect(b'"', "a date")
        try:
            return datetime.date(int(year), month, int(day))
        except ValueError:
            raise _SyntaxError("invalid date") from None

    def date_time(self) -> datetime.datetime:
        self.expect(b'"', "a date-time")
        m = _DATE_TIME.fullmatch(self.buf[self.pos : self.pos + 26])
        if not m or m.group(2).upper() not in _MONTHS:
            raise _SyntaxError("invalid date-time")
        self.pos += 26
        self.expect(b'"', "a date-time")
        day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
        month = _MONTHS[mon.upper()]
        try:
            offset = datetime.timedelta(hours=int(zh), minutes=int(zm))
            tz = datetime.timezone(-offset if sign == b"-" else offset)
            return datetime.datetime(int(year), month, int(day), int(hh), int(mm), int(ss), tzinfo=tz)
        except ValueError:
            raise _SyntaxError("invalid date-time") from None

    # search

    def search_key(self) -> SearchKey:
        self.item()
        c = self.peek()
        if c == 0x28:
            self.open()
            keys = [self.search_key()]
            while self.peek() == 0x20:
                self.pos += 1
                keys.append(self.search_key())
            self.close()
            return SearchKey("AND", tuple(keys))
        if c == 0x2A or c in _DIGITS:
            return SearchKey("SET", (self.sequence_set(),))
        name = self.text_atom().upper()
        if name in _FLAG_ONLY_KEYS:
            return SearchKey(name)
        if name in _STRING_KEYS:
            self.sp()
            return SearchKey(name, (self.astring(),))
        if name in _DATE_KEYS:
            self.sp()
            return SearchKey(name, (self.date(),))
        if name in ("KEYWORD", "UNKEYWORD"):
            self.sp()
            return SearchKey(name, (self.text_atom(),))
        if name in ("LARGER", "SMALLER"):
            self.sp()
            return SearchKey(name, (self.number(),))
        if name == "HEADER":
            self.sp()
            field_name = self.astring()
            self.sp()
            return SearchKey(name, (field_name.decode("ascii", "replace"), self.astring()))
        if name == "UID":
            self.sp()
            return SearchKey(name, (self.sequence_set(),))
        if name == "NOT":
            self.sp()
            self.descend()
            key = self.search_key()
            self.depth -= 1
            return SearchKey(name, (key,))
        if name == "OR":
            self.sp()
            self.descend()
            a = self.search_key()
            self.sp()
            b = self.search_key()
            self.depth -= 1
            return SearchKey(name, (a, b))
        raise _SyntaxError(f"unknown search key {name[:40]}")

    # fetch

    def section(self) -> Section:
        self.expect(b"[")
        part: list[int] = []
        text = None
        fields: tuple[str, ...] = ()
        if self.peek() != 0x5D:
            while self.peek() in _DIGITS:
                part.append(self.number(nonzero=True))
                if self.peek() != 0x2E:
                    break
                self.pos += 1
            if not part or self.buf[self.pos - 1] == 0x2E:
                word = self.take(_SECTION_CHARS).upper().decode("ascii")
                if word not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
                    raise _SyntaxError("invalid section")
                if word == "MIME" and not part:
                    raise _SyntaxError("MIME needs a part number")
                text = word
                if word.startswith("HEADER.FIELDS"):
                    self.sp()
                    self.open()
                    names = []
                    while True:
                        self.item()
                        names.append(self.astring().decode("ascii", "replace"))
                        if self.peek() != 0x20:
                            break
                        self.pos += 1
                    self.close()
                    fields = tuple(names)
        self.expect(b"]")
        return Section(tuple(part), text, fields)

    def fetch_att(self) -> FetchAtt:
        self.item()
        name = self.take(_FETCH_NAME_CHARS).upper().decode("ascii")
        if name in ("BODY", "BODY.PEEK") and self.peek() == 0x5B:
            section = self.section()
            partial = None
            if self.peek() == 0x3C:
                self.pos += 1
                origin = self.number()
                self.expect(b".")
                length = self.number(nonzero=True)
                self.expect(b">")
                partial = (origin, length)
            return FetchAtt("BODY", section, partial, peek=name == "BODY.PEEK")
        if name in _SIMPLE_FETCH:
            return FetchAtt(name)
        raise _SyntaxError("invalid fetch attribute")


_SECTION_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")
_FETCH_NAME_CHARS = _SECTION_CHARS | _DIGITS
ATOM_CHARS_BYTES = {bytes([c]) for c in ATOM_CHARS}
_DATE_TIME = re.compile(
    rb"([ 0-9][0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)


# ---- the commands ---------------------------------------------------------------------------------------------------


def _no_args(r: _Reader, uid: bool) -> tuple:
    return ()


def _one_mailbox(r: _Reader, uid: bool) -> tuple:
    r.sp()
    return (r.astring(),)


def _authenticate(r: _Reader, uid: bool) -> tuple:
    r.sp()
    mechanism = r.text_atom().upper()
    initial = None
    if r.peek() == 0x20:
        r.pos += 1
        if r.at(b"=") and r.buf[r.pos + 1 : r.pos + 2] == b"\r":
            r.pos += 1
            initial = b""
        else:
            initial = r.take(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
            if not initial or not _BASE64.match(initial):
                raise _SyntaxError("invalid base64 initial response")
            try:
                binascii.a2b_base64(initial)
            except binascii.Error:
                raise _SyntaxError("invalid base64 initial response") from None
    return (mechanism, initial)


def _login(r: _Reader, uid: bool) -> tuple:
    r.sp()
    user = r.astring()
    r.sp()
    return (user, r.astring())


def _enable(r: _Reader, uid: bool) -> tuple:
    caps = []
    while r.peek() == 0x20:
        r.pos += 1
        r.item()
        caps.append(r.text_atom().upper())
    if not caps:
        raise _SyntaxError("ENABLE needs a capability")
    return (tuple(caps),)


def _id(r: _Reader, uid: bool) -> tuple:
    r.sp()
    if r.at(b"NIL"):
        r.pos += 3
        return (None,)
    r.open()
    pairs = []
    if r.peek() != 0x29:
        while True:
            r.item()
            key = r.string()
            r.sp()
            pairs.append((key, r.nstring()))
            if r.peek() != 0x20:
                break
            r.pos += 1
    r.close()
    if len(pairs) > 30:  # RFC 2971 §3.3
        raise _SyntaxError("more than 30 ID fields")
    return (tuple(pairs),)


def _rename(r: _Reader, uid: bool) -> tuple:
    r.sp()
    old = r.astring()
    r.sp()
    return (old, r.astring())


def _list(r: _Reader, uid: bool) -> tuple:
    r.sp()
    select: tuple[str, ...] = ()
    if r.peek() == 0x28:
        select = r.atom_list()
        r.sp()
    reference = r.astring()
    r.sp()
    if r.peek() == 0x28:
        r.open()
        patterns = []
        while True:
            r.item()
            patterns.append(r.list_mailbox())
            if r.peek() != 0x20:
                break
            r.pos += 1
        r.close()
    else:
        patterns = [r.list_mailbox()]
    returns: tuple[str, ...] = ()
    if r.peek() == 0x20:
        r.pos += 1
        r.expect(b"RETURN")
        r.sp()
        returns = r.atom_list()
    return (reference, tuple(patterns), select, returns)


def _lsub(r: _Reader, uid: bool) -> tuple:
    r.sp()
    reference = r.astring()
    r.sp()
    return (reference, r.list_mailbox())


def _status(r: _Reader, uid: bool) -> tuple:
    r.sp()
    mailbox = r.astring()
    r.sp()
    items = r.atom_list(allow_empty=False)
    for item in items:
        if item not in _STATUS_ITEMS:
            raise _SyntaxError(f"unknown status item {item[:40]}")
    return (mailbox, items)


def _append(r: _Reader, uid: bool) -> tuple:
    r.sp()
    mailbox = r.astring()
    r.sp()
    flags: tuple[str, ...] = ()
    when = None
    if r.peek() == 0x28:
        flags = r.flag_list()
        r.sp()
    if r.peek() == 0x22:
        when = r.date_time()
        r.sp()
    if not r.at_literal():
        raise _SyntaxError("APPEND needs a literal")
    return (mailbox, flags, when, r.literal())


def _expunge(r: _Reader, uid: bool) -> tuple:
    if uid:
        r.sp()
        return (r.sequence_set(),)
    return ()


def _search(r: _Reader, uid: bool) -> tuple:
    r.sp()
    charset = None
    if r.at(b"CHARSET "):
        r.pos += 8
        charset = r.astring().decode("ascii", "replace").upper()
        r.sp()
    keys = [r.search_key()]
    while r.peek() == 0x20:
        r.pos += 1
        keys.append(r.search_key())
    return (charset, SearchKey("AND", tuple(keys)))


def _fetch(r: _Reader, uid: bool) -> tuple:
    r.sp()
    seq = r.sequence_set()
    r.sp()
    if r.peek() == 0x28:
        r.open()
        atts = [r.fetch_att()]
        while r.peek() == 0x20:
            r.pos += 1
            atts.append(r.fetch_att())
        r.close()
        return (seq, tuple(atts))
    for macro, names in _FETCH_MACROS.items():
        if r.at(macro.encode()) and r.buf[r.pos + len(macro) : r.pos + len(macro) + 1] in (b"\r", b" "):
            r.pos += len(macro)
            return (seq, tuple(FetchAtt(n) for n in names))
    return (seq, (r.fetch_att(),))


def _store(r: _Reader, uid: bool) -> tuple:
    r.sp()
    seq = r.sequence_set()
    r.sp()
    op = ""
    if r.peek() in (0x2B, 0x2D):
        op = chr(r.peek())
        r.pos += 1
    r.expect(b"FLAGS")
    silent = r.at(b".SILENT")
    if silent:
        r.pos += 7
    r.sp()
    if r.peek() == 0x28:
        flags = r.flag_list()
    else:
        flags_l = [r.flag()]
        r.item()
        while r.peek() == 0x20:
            r.pos += 1
            r.item()
            flags_l.append(r.flag())
        flags = tuple(flags_l)
    return (seq, StoreAction(op, silent), flags)


def _copy(r: _Reader, uid: bool) -> tuple:
    r.sp()
    seq = r.sequence_set()
    r.sp()
    return (seq, r.astring())


_HANDLERS = {
    **dict.fromkeys(_NO_ARGS, _no_args),
    **dict.fromkeys(_ONE_MAILBOX, _one_mailbox),
    "GETQUOTA": _one_mailbox,
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "ENABLE": _enable,
    "ID": _id,
    "RENAME": _rename,
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
    "EXPUNGE": _expunge,
    "SEARCH": _search,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy,
    "MOVE": _copy,
}
