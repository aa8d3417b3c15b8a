"""The typed values and events of the IMAP command parser (parser.py).

`CommandParser.feed()` returns a list of events:

* `Command`: one complete, syntactically valid command. `args` is a tuple whose
  shape depends on `name` (see `ARGS` below); strings are `bytes` exactly as the
  client sent them (mailbox names are still modified UTF-7: see mailbox.py).
* `NeedContinuation`: the client announced a synchronizing literal `{n}` that is
  within the limits; the endpoint sends `+ Ready` (formatter.continuation) and the
  client then sends the n octets.
* `Bad` / `TooBig`: the command (or line) is refused; `response()` renders the
  reply the endpoint sends (tagged when the tag was readable, else untagged).
  The parser has already recovered: the next line is a new command.
* `IdleDone`: the DONE line that ends IDLE.
* `ContinuationLine`: a line sent in answer to a continuation request during
  AUTHENTICATE (a SASL response, or `*` to cancel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ---- values ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceSet:
    """A sequence-set: ranges of message numbers or UIDs. `None` stands for `*`.

    A single number n is the range (n, n); "5:*" is (5, None); ranges keep the
    client's order and orientation ("9:3" stays (9, 3): the server normalises
    once it knows what `*` is)."""

    ranges: tuple[tuple[int | None, int | None], ...]

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """The ranges with `*` replaced by `largest` and each range ordered (low, high)."""
        out = []
        for lo, hi in self.ranges:
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            out.append((min(a, b), max(a, b)))
        return out


@dataclass(frozen=True)
class Section:
    """The `[...]` of BODY[section]: part numbers, then an optional text specifier.

    `text` is None (the whole part), "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT",
    "TEXT" or "MIME" (only after part numbers). `fields` holds the header field names
    of HEADER.FIELDS[.NOT], as sent."""

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchAtt:
    """One fetch attribute. `name` is upper-case: FLAGS, INTERNALDATE, RFC822.SIZE,
    RFC822, RFC822.HEADER, RFC822.TEXT, ENVELOPE, BODY, BODYSTRUCTURE, UID, or
    BODY with a `section` (and `peek` for BODY.PEEK). `partial` is (origin, length)."""

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False


@dataclass(frozen=True)
class StoreAction:
    """`+FLAGS`, `-FLAGS` or `FLAGS`, with or without `.SILENT`."""

    op: str  # "+", "-" or "" (replace)
    silent: bool = False


@dataclass(frozen=True)
class SearchKey:
    """One search key. `name` is the upper-case key; `args` depend on it:

    * no args: ALL ANSWERED DELETED DRAFT FLAGGED NEW OLD RECENT SEEN UNANSWERED UNDELETED UNDRAFT UNFLAGGED UNSEEN
    * (bytes,): BCC BODY CC FROM SUBJECT TEXT TO
    * (datetime.date,): BEFORE ON SINCE SENTBEFORE SENTON SENTSINCE
    * (str,): KEYWORD UNKEYWORD
    * (int,): LARGER SMALLER
    * (field: str, value: bytes): HEADER
    * (SequenceSet,): SET (a bare sequence set) and UID
    * (SearchKey,): NOT; (SearchKey, SearchKey): OR
    * (SearchKey, ...): AND (a parenthesised group, and the top level of SEARCH)
    """

    name: str
    args: tuple = ()


# ---- events ---------------------------------------------------------------------------------------------------------

# The shape of Command.args for each command name (documentation, and checked by the tests):
ARGS: dict[str, str] = {
    "CAPABILITY": "()",
    "NOOP": "()",
    "LOGOUT": "()",
    "STARTTLS": "()",
    "AUTHENTICATE": "(mechanism: str (upper), initial_response: bytes | None)  # b'' for '='",
    "LOGIN": "(userid: bytes, password: bytes)",
    "ENABLE": "(capabilities: tuple[str, ...] (upper),)",
    "ID": "(None | tuple[tuple[bytes, bytes | None], ...],)",
    "SELECT": "(mailbox: bytes,)",
    "EXAMINE": "(mailbox: bytes,)",
    "CREATE": "(mailbox: bytes,)",
    "DELETE": "(mailbox: bytes,)",
    "RENAME": "(old: bytes, new: bytes)",
    "SUBSCRIBE": "(mailbox: bytes,)",
    "UNSUBSCRIBE": "(mailbox: bytes,)",
    "LIST": "(reference: bytes, patterns: tuple[bytes, ...], select_opts: tuple[str, ...], return_opts: tuple[str, ...])",
    "LSUB": "(reference: bytes, pattern: bytes)",
    "NAMESPACE": "()",
    "STATUS": "(mailbox: bytes, items: tuple[str, ...] (upper))",
    "APPEND": "(mailbox: bytes, flags: tuple[str, ...], date_time: datetime | None, message: bytes)",
    "CHECK": "()",
    "CLOSE": "()",
    "UNSELECT": "()",
    "EXPUNGE": "() or, with uid=True, (SequenceSet,)",
    "SEARCH": "(charset: str | None, SearchKey('AND', keys))",
    "FETCH": "(SequenceSet, tuple[FetchAtt, ...])  # macros ALL/FAST/FULL expanded",
    "STORE": "(SequenceSet, StoreAction, flags: tuple[str, ...])",
    "COPY": "(SequenceSet, mailbox: bytes)",
    "MOVE": "(SequenceSet, mailbox: bytes)",
    "IDLE": "()",
    "GETQUOTA": "(quota_root: bytes,)",
    "GETQUOTAROOT": "(mailbox: bytes,)",
}

UID_COMMANDS = frozenset({"COPY", "MOVE", "FETCH", "SEARCH", "STORE", "EXPUNGE"})


@dataclass(frozen=True)
class Command:
    tag: str
    name: str  # upper-case command name, without the UID prefix
    args: tuple = ()
    uid: bool = False  # the command came as "UID <name> ..."


@dataclass(frozen=True)
class NeedContinuation:
    tag: str | None
    size: int  # the announced literal size


@dataclass(frozen=True)
class Bad:
    """A syntax error or a limit. The endpoint sends `response()` and carries on,
    unless `close` is set (the stream can no longer be framed: send, then close)."""

    tag: str | None
    text: str
    code: str | None = None
    close: bool = False
    status: str = field(default="BAD")

    def response(self) -> bytes:
        from mailwarden.protocol.imap.formatter import tagged, untagged_status

        if self.tag is None:
            return untagged_status(self.status, self.text, self.code)
        return tagged(self.tag, self.status, self.text, self.code)


@dataclass(frozen=True)
class TooBig(Bad):
    """A literal (or the whole command) over its limit, refused before it was read.

    For a synchronizing literal the status is NO: the client never got `+` and so
    never sent the octets. For a non-synchronizing one it is BAD (RFC 7888 §4),
    and the parser has skipped the octets that followed without keeping them."""

    code: str | None = "TOOBIG"


@dataclass(frozen=True)
class IdleDone:
    tag: str  # the tag of the IDLE command this DONE ends


@dataclass(frozen=True)
class ContinuationLine:
    tag: str  # the tag of the AUTHENTICATE command this line answers
    data: bytes  # the line without its CRLF


Event = Command | NeedContinuation | Bad | TooBig | IdleDone | ContinuationLine

__all__ = [
    "ARGS",
    "UID_COMMANDS",
    "Bad",
    "Command",
    "ContinuationLine",
    "Event",
    "FetchAtt",
    "IdleDone",
    "NeedContinuation",
    "SearchKey",
    "Section",
    "SequenceSet",
    "StoreAction",
    "TooBig",
]
