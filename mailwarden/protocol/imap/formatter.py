"""IMAP response formatting: the one place responses are rendered.

Values are encoded by what they contain, never by what the caller hopes:

* `atom()` accepts only ATOM-CHARs (raises otherwise): use it for keywords you control.
* `string()` quotes a short, plain ASCII value (escaping `\\` and `"`) and sends
  anything with CR, LF, NUL, 8-bit octets, or longer than `QUOTED_MAX` as a
  literal `{n}\\r\\n...`. `astring()` uses a bare atom when the value is one.
* Free text (`tagged`, `untagged_status`, `continuation`) has every control
  character removed, so nothing a client sent can end a response line early or
  forge another one, and a response code cannot be closed early (`]` removed).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from mailwarden.protocol.imap.parser import ASTRING_CHARS, ATOM_CHARS, TAG_CHARS

QUOTED_MAX = 1024  # longer strings go out as literals
_QUOTABLE = frozenset(c for c in range(0x01, 0x80) if c not in (0x0A, 0x0D))
_STATUSES = frozenset({"OK", "NO", "BAD", "PREAUTH", "BYE"})
_TEXT_DROP = dict.fromkeys([*range(0x20), 0x7F])
_CODE_DROP = dict.fromkeys([*range(0x20), 0x7F, ord("]")])


class Atom(str):
    """A value sent verbatim as an atom (validated): `Atom("\\\\Seen")` in a list is a flag, not a string."""


class Raw(bytes):
    """Octets the caller already encoded (a nested structure built with these helpers)."""


def clean_text(text: str) -> str:
    """Free response text: no control characters (so no CR/LF injection), never empty."""
    cleaned = text.translate(_TEXT_DROP).strip()
    return cleaned or "done"


def _clean_code(code: str) -> str:
    cleaned = code.translate(_CODE_DROP).strip()
    if not cleaned:
        raise ValueError("empty response code")
    return cleaned


def _tag(tag: str) -> bytes:
    raw = tag.encode("ascii", "replace")
    if not raw or any(c not in TAG_CHARS for c in raw):
        raise ValueError(f"invalid tag {tag!r}")
    return raw


def _status_line(prefix: bytes, status: str, text: str, code: str | None) -> bytes:
    if status not in _STATUSES:
        raise ValueError(f"invalid status {status!r}")
    body = clean_text(text)
    if code is not None:
        body = f"[{_clean_code(code)}] {body}"
    return prefix + b" " + status.encode() + b" " + body.encode("utf-8") + b"\r\n"


def tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """`tag OK|NO|BAD [code] text` CRLF."""
    if status not in ("OK", "NO", "BAD"):
        raise ValueError(f"invalid tagged status {status!r}")
    return _status_line(_tag(tag), status, text, code)


def untagged_status(status: str, text: str, code: str | None = None) -> bytes:
    """`* OK|NO|BAD|PREAUTH|BYE [code] text` CRLF."""
    return _status_line(b"*", status, text, code)


def untagged(*items: object) -> bytes:
    """`* item item ...` CRLF, each item encoded by `value()` (e.g. `untagged(3, Atom("EXISTS"))`)."""
    if not items:
        raise ValueError("empty untagged response")
    return b"* " + b" ".join(value(item) for item in items) + b"\r\n"


def continuation(text: str = "Ready") -> bytes:
    """`+ text` CRLF: the go-ahead for a synchronizing literal, IDLE, or a SASL challenge."""
    return b"+ " + clean_text(text).encode("utf-8") + b"\r\n"


def continuation_data(data: bytes) -> bytes:
    """`+ base64` CRLF for a SASL challenge (`data` is the encoded challenge, checked to be base64)."""
    if any(c not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" for c in data):
        raise ValueError("SASL challenge must be base64")
    return b"+ " + data + b"\r\n"


# ---- values ---------------------------------------------------------------------------------------------------------


def _octets(s: str | bytes) -> bytes:
    return s.encode("utf-8") if isinstance(s, str) else bytes(s)


def atom(s: str | bytes) -> bytes:
    raw = _octets(s)
    if not raw or any(c not in ATOM_CHARS for c in raw):
        raise ValueError(f"not an atom: {raw[:40]!r}")
    return raw


def literal(s: str | bytes) -> bytes:
    raw = _octets(s)
    return b"{%d}\r\n" % len(raw) + raw


def quoted(s: str | bytes) -> bytes:
    raw = _octets(s)
    if any(c not in _QUOTABLE for c in raw):
        raise ValueError("cannot be quoted")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def string(s: str | bytes) -> bytes:
    """A quoted string when that is safe and short, else a literal."""
    raw = _octets(s)
    if len(raw) <= QUOTED_MAX and all(c in _QUOTABLE for c in raw):
        return quoted(raw)
    return literal(raw)


def astring(s: str | bytes) -> bytes:
    """A bare atom when the value is one (and is not NIL, which a reader of nstring would take as nil)."""
    raw = _octets(s)
    if raw and raw.upper() != b"NIL" and len(raw) <= QUOTED_MAX and all(c in ASTRING_CHARS for c in raw):
        return raw
    return string(raw)


def nstring(s: str | bytes | None) -> bytes:
    return b"NIL" if s is None else string(s)


nil_or_string = nstring


def number(n: int) -> bytes:
    if not 0 <= n <= 0xFFFFFFFFFFFFFFFF:  # number64 (RFC 9051) for sizes and mod-sequences
        raise ValueError("number out of range")
    return b"%d" % n


def plist(items: Iterable[object]) -> bytes:
    """A parenthesised list, each item encoded by `value()`."""
    return b"(" + b" ".join(value(item) for item in items) + b")"


def flag_list(flags: Iterable[str]) -> bytes:
    return plist(Atom(f) for f in flags)


def mailbox(name: str) -> bytes:
    """A mailbox name: modified UTF-7 (RFC 3501 §5.1.3), then an astring."""
    from mailwarden.protocol.imap.mailbox import encode_mailbox_name

    return astring(encode_mailbox_name(name))


def date_time(when: datetime.datetime) -> bytes:
    """INTERNALDATE: `"dd-Mon-yyyy hh:mm:ss +zzzz"`."""
    if when.tzinfo is None:
        raise ValueError("date-time needs a time zone")
    offset = when.utcoffset() or datetime.timedelta()
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][when.month - 1]
    text = f"{when.day:2d}-{month}-{when.year:04d} {when:%H:%M:%S} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    return b'"' + text.encode() + b'"'


def value(item: object) -> bytes:
    """Encode one value: None → NIL, int → number, Atom → atom, Raw → as is, str/bytes → string,
    list/tuple → parenthesised list, datetime → date-time."""
    if item is None:
        return b"NIL"
    if isinstance(item, bool):
        raise TypeError("no IMAP encoding for bool")
    if isinstance(item, int):
        return number(item)
    if isinstance(item, Atom):
        raw = item.encode("ascii")
        body = raw[1:] if raw.startswith(b"\\") else raw  # \Seen, \Noselect: "\" atom
        if raw == b"\\*":
            return raw
        atom(body)
        return raw
    if isinstance(item, Raw):
        return bytes(item)
    if isinstance(item, str | bytes):
        return string(item)
    if isinstance(item, list | tuple):
        return plist(item)
    if isinstance(item, datetime.datetime):
        return date_time(item)
    raise TypeError(f"no IMAP encoding for {type(item).__name__}")


def address(name: str | bytes | None, adl: None, mailbox_: str | bytes | None, host: str | bytes | None) -> Raw:
    """One ENVELOPE address: (name adl mailbox host)."""
    return Raw(plist([name, adl, mailbox_, host]))


def envelope(
    date: str | bytes | None,
    subject: str | bytes | None,
    from_: list[Raw] | None,
    sender: list[Raw] | None,
    reply_to: list[Raw] | None,
    to: list[Raw] | None,
    cc: list[Raw] | None,
    bcc: list[Raw] | None,
    in_reply_to: str | bytes | None,
    message_id: str | bytes | None,
) -> Raw:
    """The ENVELOPE structure (RFC 3501 §7.4.2); address lists are lists of `address()` or None."""

    def addrs(lst: list[Raw] | None) -> object:
        return None if not lst else Raw(b"(" + b"".join(lst) + b")")

    return Raw(
        plist((date, subject, *(addrs(x) for x in (from_, sender, reply_to, to, cc, bcc)), in_reply_to, message_id))
    )
