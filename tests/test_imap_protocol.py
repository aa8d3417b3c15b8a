"""The sans-I/O IMAP core (mailwarden/protocol/imap): parser, formatter, mailbox names.

Table-driven tests for each command (valid and invalid forms), the limits, and
hypothesis properties: any bytes never raise and never grow memory past the
bounds, any split of the stream gives the same events, and values encoded by
the formatter parse back to the same octets.
"""

from __future__ import annotations

import datetime
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden.protocol.imap import (
    Bad,
    Command,
    CommandParser,
    ContinuationLine,
    FetchAtt,
    IdleDone,
    MailboxNameError,
    NeedContinuation,
    SearchKey,
    Section,
    SequenceSet,
    StoreAction,
    TooBig,
    decode_mailbox_name,
    encode_mailbox_name,
)
from mailwarden.protocol.imap import formatter as fmt
from mailwarden.protocol.imap.commands import ARGS

# IMAP_FUZZ_EXAMPLES=5000 for a deeper run than the default.
PROPS = settings(
    max_examples=int(os.environ.get("IMAP_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MAX_LINE = 256
MAX_LITERAL = 4096


def parser(**kw) -> CommandParser:
    kw.setdefault("max_line", MAX_LINE)
    kw.setdefault("max_literal", MAX_LITERAL)
    return CommandParser(**kw)


def parse_one(wire: bytes, **kw):
    """Feed a whole command (answering continuations implicitly) and return the one non-continuation event."""
    events = [e for e in parser(**kw).feed(wire) if not isinstance(e, NeedContinuation)]
    assert len(events) == 1, events
    return events[0]


def S(*ranges) -> SequenceSet:
    return SequenceSet(tuple(ranges))


def K(name, *args) -> SearchKey:
    return SearchKey(name, args)


T = datetime.timezone
UTC1 = T(datetime.timedelta(hours=1))

# ---- valid commands -------------------------------------------------------------------------------------------------

VALID = [
    (b"a CAPABILITY\r\n", "CAPABILITY", (), False),
    (b"a noop\r\n", "NOOP", (), False),
    (b"a LOGOUT\r\n", "LOGOUT", (), False),
    (b"a STARTTLS\r\n", "STARTTLS", (), False),
    (b"a AUTHENTICATE PLAIN\r\n", "AUTHENTICATE", ("PLAIN", None), False),
    (b"a AUTHENTICATE plain AGpvZQBwYXNz\r\n", "AUTHENTICATE", ("PLAIN", b"AGpvZQBwYXNz"), False),
    (b"a AUTHENTICATE PLAIN =\r\n", "AUTHENTICATE", ("PLAIN", b""), False),
    (b"a LOGIN joe secret\r\n", "LOGIN", (b"joe", b"secret"), False),
    (b'a LOGIN "jo e" "p\\"a\\\\ss"\r\n', "LOGIN", (b"jo e", b'p"a\\ss'), False),
    (b"a LOGIN {3}\r\njoe {4+}\r\n\xc3\xa9\r\n\r\n", "LOGIN", (b"joe", b"\xc3\xa9\r\n"), False),
    (b"a LOGIN joe] x\r\n", "LOGIN", (b"joe]", b"x"), False),
    (b"a ENABLE UTF8=ACCEPT condstore\r\n", "ENABLE", (("UTF8=ACCEPT", "CONDSTORE"),), False),
    (b"a ID NIL\r\n", "ID", (None,), False),
    (b'a ID ("name" "mutt" "version" NIL)\r\n', "ID", (((b"name", b"mutt"), (b"version", None)),), False),
    (b"a ID ()\r\n", "ID", ((),), False),
    (b"a SELECT INBOX\r\n", "SELECT", (b"INBOX",), False),
    (b'a EXAMINE "Sent Items"\r\n', "EXAMINE", (b"Sent Items",), False),
    (b"a CREATE Entw&APw-rfe\r\n", "CREATE", (b"Entw&APw-rfe",), False),
    (b"a DELETE foo\r\n", "DELETE", (b"foo",), False),
    (b"a RENAME foo bar\r\n", "RENAME", (b"foo", b"bar"), False),
    (b"a SUBSCRIBE foo\r\n", "SUBSCRIBE", (b"foo",), False),
    (b"a UNSUBSCRIBE foo\r\n", "UNSUBSCRIBE", (b"foo",), False),
    (b'a LIST "" *\r\n', "LIST", (b"", (b"*",), (), ()), False),
    (b"a LIST ~/Mail/ %/foo*\r\n", "LIST", (b"~/Mail/", (b"%/foo*",), (), ()), False),
    (
        b'a LIST (SUBSCRIBED) "" ("INBOX" Sent*) RETURN (SPECIAL-USE children)\r\n',
        "LIST",
        (b"", (b"INBOX", b"Sent*"), ("SUBSCRIBED",), ("SPECIAL-USE", "CHILDREN")),
        False,
    ),
    (b'a LSUB "" %\r\n', "LSUB", (b"", b"%"), False),
    (b"a NAMESPACE\r\n", "NAMESPACE", (), False),
    (b"a STATUS INBOX (MESSAGES unseen UIDNEXT)\r\n", "STATUS", (b"INBOX", ("MESSAGES", "UNSEEN", "UIDNEXT")), False),
    (b"a APPEND INBOX {5}\r\nhello\r\n", "APPEND", (b"INBOX", (), None, b"hello"), False),
    (
        b'a APPEND Drafts (\\Seen \\Draft $Label) " 5-Mar-2024 01:02:03 -0130" {2+}\r\nhi\r\n',
        "APPEND",
        (
            b"Drafts",
            ("\\Seen", "\\Draft", "$Label"),
            datetime.datetime(2024, 3, 5, 1, 2, 3, tzinfo=T(-datetime.timedelta(hours=1, minutes=30))),
            b"hi",
        ),
        False,
    ),
    (b"a APPEND INBOX () {0}\r\n\r\n", "APPEND", (b"INBOX", (), None, b""), False),
    (b"a CHECK\r\n", "CHECK", (), False),
    (b"a CLOSE\r\n", "CLOSE", (), False),
    (b"a UNSELECT\r\n", "UNSELECT", (), False),
    (b"a EXPUNGE\r\n", "EXPUNGE", (), False),
    (b"a UID EXPUNGE 3:5,9\r\n", "EXPUNGE", (S((3, 5), (9, 9)),), True),
    (b"a SEARCH ALL\r\n", "SEARCH", (None, K("AND", K("ALL"))), False),
    (
        b"a SEARCH CHARSET UTF-8 FROM {3}\r\n\xc3\xa9x UNSEEN\r\n",
        "SEARCH",
        ("UTF-8", K("AND", K("FROM", b"\xc3\xa9x"), K("UNSEEN"))),
        False,
    ),
    (
        b'a UID SEARCH 1:* NOT DELETED OR (SEEN FLAGGED) KEYWORD $Junk SINCE 1-Feb-2024 BEFORE "15-Mar-2024"\r\n',
        "SEARCH",
        (
            None,
            K(
                "AND",
                K("SET", S((1, None))),
                K("NOT", K("DELETED")),
                K("OR", K("AND", K("SEEN"), K("FLAGGED")), K("KEYWORD", "$Junk")),
                K("SINCE", datetime.date(2024, 2, 1)),
                K("BEFORE", datetime.date(2024, 3, 15)),
            ),
        ),
        True,
    ),
    (
        b"a SEARCH HEADER Message-ID <x@y> LARGER 100 SMALLER 5 UID 4:* SENTON 1-jan-2000 TO bob\r\n",
        "SEARCH",
        (
            None,
            K(
                "AND",
                K("HEADER", "Message-ID", b"<x@y>"),
                K("LARGER", 100),
                K("SMALLER", 5),
                K("UID", S((4, None))),
                K("SENTON", datetime.date(2000, 1, 1)),
                K("TO", b"bob"),
            ),
        ),
        False,
    ),
    (
        b"a SEARCH ANSWERED BCC x BODY y CC z DRAFT NEW OLD RECENT SUBJECT s TEXT t UNANSWERED UNDELETED UNDRAFT "
        b"UNFLAGGED UNKEYWORD k ON 2-Jan-2020 SENTBEFORE 2-Jan-2020 SENTSINCE 2-Jan-2020\r\n",
        "SEARCH",
        (
            None,
            K(
                "AND",
                K("ANSWERED"),
                K("BCC", b"x"),
                K("BODY", b"y"),
                K("CC", b"z"),
                K("DRAFT"),
                K("NEW"),
                K("OLD"),
                K("RECENT"),
                K("SUBJECT", b"s"),
                K("TEXT", b"t"),
                K("UNANSWERED"),
                K("UNDELETED"),
                K("UNDRAFT"),
                K("UNFLAGGED"),
                K("UNKEYWORD", "k"),
                K("ON", datetime.date(2020, 1, 2)),
                K("SENTBEFORE", datetime.date(2020, 1, 2)),
                K("SENTSINCE", datetime.date(2020, 1, 2)),
            ),
        ),
        False,
    ),
    (
        b"a FETCH 1:3 ALL\r\n",
        "FETCH",
        (S((1, 3)), tuple(FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"))),
        False,
    ),
    (
        b"a FETCH * fast\r\n",
        "FETCH",
        (S((None, None)), tuple(FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE"))),
        False,
    ),
    (
        b"a FETCH 2 FULL\r\n",
        "FETCH",
        (S((2, 2)), tuple(FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"))),
        False,
    ),
    (b"a FETCH 1 uid\r\n", "FETCH", (S((1, 1)), (FetchAtt("UID"),)), False),
    (
        b"a UID FETCH 9:3 (FLAGS INTERNALDATE RFC822.SIZE RFC822 RFC822.HEADER RFC822.TEXT ENVELOPE BODY BODYSTRUCTURE UID)\r\n",
        "FETCH",
        (
            S((9, 3)),
            tuple(
                FetchAtt(n)
                for n in [
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
            ),
        ),
        True,
    ),
    (
        b"a FETCH 1 (BODY[] BODY.PEEK[HEADER] BODY[TEXT]<0.1024> BODY[1.2.MIME] BODY[2] BODY.PEEK[3.HEADER.FIELDS.NOT (Received)])\r\n",
        "FETCH",
        (
            S((1, 1)),
            (
                FetchAtt("BODY", Section()),
                FetchAtt("BODY", Section((), "HEADER"), peek=True),
                FetchAtt("BODY", Section((), "TEXT"), (0, 1024)),
                FetchAtt("BODY", Section((1, 2), "MIME")),
                FetchAtt("BODY", Section((2,))),
                FetchAtt("BODY", Section((3,), "HEADER.FIELDS.NOT", ("Received",)), peek=True),
            ),
        ),
        False,
    ),
    (
        b"a FETCH 1 BODY.PEEK[HEADER.FIELDS (From Subject)]\r\n",
        "FETCH",
        (S((1, 1)), (FetchAtt("BODY", Section((), "HEADER.FIELDS", ("From", "Subject")), peek=True),)),
        False,
    ),
    (b"a STORE 1:2 FLAGS (\\Seen)\r\n", "STORE", (S((1, 2)), StoreAction(""), ("\\Seen",)), False),
    (
        b"a UID STORE 5 -FLAGS.SILENT \\Deleted $x\r\n",
        "STORE",
        (S((5, 5)), StoreAction("-", True), ("\\Deleted", "$x")),
        True,
    ),
    (b"a STORE 1 +FLAGS ()\r\n", "STORE", (S((1, 1)), StoreAction("+"), ()), False),
    (b"a COPY 1:* Archive\r\n", "COPY", (S((1, None)), b"Archive"), False),
    (b'a UID COPY 1,2 "Trash"\r\n', "COPY", (S((1, 1), (2, 2)), b"Trash"), True),
    (b"a MOVE 3 Junk\r\n", "MOVE", (S((3, 3)), b"Junk"), False),
    (b"a UID MOVE *:4 Junk\r\n", "MOVE", (S((None, 4)), b"Junk"), True),
    (b"a IDLE\r\n", "IDLE", (), False),
    (b'a GETQUOTA ""\r\n', "GETQUOTA", (b"",), False),
    (b"a GETQUOTAROOT INBOX\r\n", "GETQUOTAROOT", (b"INBOX",), False),
]


@pytest.mark.parametrize(("wire", "name", "args", "uid"), VALID, ids=[v[0][:40].decode("latin-1") for v in VALID])
def test_valid_command(wire, name, args, uid):
    assert parse_one(wire) == Command("a", name, args, uid)


def test_every_command_has_a_valid_case():
    assert {v[1] for v in VALID} == set(ARGS)


# ---- invalid commands -----------------------------------------------------------------------------------------------

INVALID = [
    (b"a FOO\r\n", "a", "unknown command"),
    (b"a\r\n", "a", "expected a space"),
    (b"+ NOOP\r\n", None, "invalid tag"),
    (b"\r\n", None, "invalid tag"),
    (b'"a" NOOP\r\n', None, "invalid tag"),
    (b"a NOOP x\r\n", "a", "unexpected data"),
    (b"a NOOP \r\n", "a", "unexpected data"),
    (b"a  NOOP\r\n", "a", "expected an atom"),
    (b"a UID NOOP\r\n", "a", "not a command"),
    (b"a AUTHENTICATE\r\n", "a", "expected a space"),
    (b"a AUTHENTICATE PLAIN a*b\r\n", "a", "base64"),
    (b"a AUTHENTICATE PLAIN abc\r\n", "a", "base64"),
    (b"a LOGIN joe\r\n", "a", "expected a space"),
    (b'a LOGIN "jo\\e" x\r\n', "a", "escape"),
    (b'a LOGIN "j\xc3\xa9" x\r\n', "a", "invalid character"),
    (b'a LOGIN "joe x\r\n', "a", "quoted string"),
    (b"a LOGIN joe( x\r\n", "a", "expected a space"),
    (b"a LOGIN joe {3}x\r\n", "a", "expected a literal"),
    (b"a LOGIN {3}\r\nj\x00e x\r\n", "a", "NUL"),
    (b"a ENABLE\r\n", "a", "needs a capability"),
    (b"a ID (name mutt)\r\n", "a", "expected a string"),
    (b'a ID ("a")\r\n', "a", "expected a space"),
    (b"a ID (" + b'"k" "v" ' * 31 + b'"k" "v")\r\n', "a", "30"),
    (b"a SELECT\r\n", "a", "expected a space"),
    (b"a SELECT a b\r\n", "a", "unexpected data"),
    (b"a SELECT (x)\r\n", "a", "astring"),
    (b"a RENAME foo\r\n", "a", "expected a space"),
    (b"a LIST x\r\n", "a", "expected a space"),
    (b"a LIST x y RETURN\r\n", "a", "expected a space"),
    (b"a LIST x y z\r\n", "a", "RETURN"),
    (b"a STATUS INBOX ()\r\n", "a", "an atom"),
    (b"a STATUS INBOX (BOGUS)\r\n", "a", "unknown status item"),
    (b"a STATUS INBOX MESSAGES\r\n", "a", "expected ("),
    (b"a APPEND INBOX hello\r\n", "a", "needs a literal"),
    (b'a APPEND INBOX "hello"\r\n', "a", "date-time"),
    (b'a APPEND INBOX "31-Feb-2024 01:02:03 +0000" {1}\r\nx\r\n', "a", "invalid date-time"),
    (b'a APPEND INBOX "1-Feb-2024 01:02:03 +0000" {1}\r\nx\r\n', "a", "invalid date-time"),
    (b"a APPEND INBOX (\\Seen {1}\r\nx\r\n", "a", "expected an atom"),
    (b"a EXPUNGE 1\r\n", "a", "unexpected data"),
    (b"a UID EXPUNGE\r\n", "a", "expected a space"),
    (b"a SEARCH\r\n", "a", "expected a space"),
    (b"a SEARCH BOGUS\r\n", "a", "unknown search key"),
    (b"a SEARCH SINCE 1-Foo-2024\r\n", "a", "month"),
    (b"a SEARCH SINCE 30-Feb-2024\r\n", "a", "invalid date"),
    (b"a SEARCH SINCE 1-Feb-24\r\n", "a", "year"),
    (b"a SEARCH LARGER x\r\n", "a", "number"),
    (b"a SEARCH LARGER 99999999999\r\n", "a", "number"),
    (b"a SEARCH OR SEEN\r\n", "a", "expected a space"),
    (b"a SEARCH (SEEN\r\n", "a", "expected )"),
    (b"a SEARCH ()\r\n", "a", "an atom"),
    (b"a SEARCH 0:3\r\n", "a", "non-zero"),
    (b"a FETCH 0 FLAGS\r\n", "a", "non-zero"),
    (b"a FETCH 1: FLAGS\r\n", "a", "number"),
    (b"a FETCH 1,,2 FLAGS\r\n", "a", "number"),
    (b"a FETCH 1 BOGUS\r\n", "a", "invalid fetch attribute"),
    (b"a FETCH 1 ()\r\n", "a", "invalid fetch attribute"),
    (b"a FETCH 1 BODY[MIME]\r\n", "a", "MIME needs a part"),
    (b"a FETCH 1 BODY[0]\r\n", "a", "non-zero"),
    (b"a FETCH 1 BODY[1.]\r\n", "a", "invalid section"),
    (b"a FETCH 1 BODY[HEADER.FIELDS]\r\n", "a", "expected a space"),
    (b"a FETCH 1 BODY[HEADER.FIELDS ()]\r\n", "a", "astring"),
    (b"a FETCH 1 BODY[]<0.0>\r\n", "a", "non-zero"),
    (b"a FETCH 1 BODY[]<5>\r\n", "a", "expected ."),
    (b"a FETCH 1 BODY.PEEK\r\n", "a", "invalid fetch attribute"),
    (b"a FETCH 1 RFC822.SIZE<0.1>\r\n", "a", "unexpected data"),
    (b"a STORE 1 FLAG (\\Seen)\r\n", "a", "FLAGS"),
    (b"a STORE 1 FLAGS\r\n", "a", "expected a space"),
    (b"a STORE 1 FLAGS.LOUD x\r\n", "a", "expected a space"),
    (b"a COPY 1\r\n", "a", "expected a space"),
    (b"a MOVE x Junk\r\n", "a", "number"),
    (b"a GETQUOTAROOT\r\n", "a", "expected a space"),
    (b"a FETCH 1 FLAGS\n", "a", "CRLF"),
    (b"a FETCH 1\r FLAGS\r\n", "a", "CRLF"),
    (b"a LOGIN ~{1+}\r\nx y\r\n", "a", "literal8"),
]


@pytest.mark.parametrize(("wire", "tag", "text"), INVALID, ids=[v[0][:40].decode("latin-1") for v in INVALID])
def test_invalid_command(wire, tag, text):
    p = parser(max_line=1024)
    events = [e for e in p.feed(wire) if not isinstance(e, NeedContinuation)]
    assert len(events) == 1, events
    event = events[0]
    assert type(event) is Bad
    assert event.tag == tag
    assert text in event.text
    # The parser recovered: the next command parses.
    assert p.feed(b"b NOOP\r\n") == [Command("b", "NOOP")]


def test_grammar_alone_refuses_unterminated_strings():
    assert parser().parse_command(b'a LOGIN "joe').text == "unterminated quoted string"
    assert parser().parse_command(b"a LOGIN {5}\r\njoe").text == "truncated literal"


def test_error_responses_are_tagged_with_codes():
    assert parse_one(b"a FOO\r\n").response() == b"a BAD unknown command\r\n"
    assert parse_one(b"+ FOO\r\n").response() == b"* BAD missing or invalid tag\r\n"
    p = parser()
    (ev,) = p.feed(b"a LOGIN {5000}\r\n")
    assert ev == TooBig("a", f"literal over {MAX_LINE} octets", status="NO")
    assert ev.response() == b"a NO [TOOBIG] literal over 256 octets\r\n"


# ---- literals and limits --------------------------------------------------------------------------------------------


def test_synchronizing_literal_asks_for_continuation_first():
    p = parser()
    assert p.feed(b"a APPEND INBOX {11}\r\n") == [NeedContinuation("a", 11)]
    assert p.feed(b"hello") == []
    assert p.feed(b" world\r\n") == [Command("a", "APPEND", (b"INBOX", (), None, b"hello world"))]


def test_literal_limit_depends_on_command():
    # APPEND gets max_literal; other commands get max_small_literal (default max_line).
    assert parser().feed(b"a APPEND x {4096}\r\n") == [NeedContinuation("a", 4096)]
    assert parser().feed(b"a LOGIN {257}\r\n")[0].status == "NO"
    assert parser().feed(b"a UID SEARCH TEXT {256}\r\n") == [NeedContinuation("a", 256)]


def test_huge_synchronizing_literal_refused_before_reading():
    p = CommandParser(max_line=1024, max_literal=1 << 20)
    (ev,) = p.feed(b"a APPEND INBOX {10000000}\r\n")
    assert isinstance(ev, TooBig) and ev.status == "NO" and ev.code == "TOOBIG"
    assert p.buffered() == 0
    # The client never got "+", so what comes next is a new command.
    assert p.feed(b"b NOOP\r\n") == [Command("b", "NOOP")]


def test_literal_size_outside_32_bits_closes():
    (ev,) = parser().feed(b"a APPEND INBOX {4294967296}\r\n")
    assert type(ev) is Bad and ev.close
    (ev,) = parser().feed(b"a APPEND INBOX {99999999999999999999999}\r\n")
    assert type(ev) is Bad and ev.close


def test_huge_nonsync_literal_discarded_with_bounded_memory():
    p = CommandParser(max_line=1024, max_literal=1 << 20)
    size = 10_000_000
    events = p.feed(b"a APPEND INBOX {%d+}\r\n" % size)
    assert len(events) == 1 and isinstance(events[0], TooBig) and events[0].status == "BAD"
    chunk = b"x" * 65536
    sent = 0
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        assert p.feed(piece) == []
        sent += len(piece)
        assert p.buffered() <= 64
    # The rest of the refused command, with another non-synchronizing literal, is skipped too.
    assert p.feed(b" {3+}\r\nabc\r\n") == []
    assert p.feed(b"b NOOP\r\n") == [Command("b", "NOOP")]


def test_literal_minus_limits_nonsync_to_4096():
    p = parser(literal_plus=False)
    assert p.feed(b"a APPEND x {4096+}\r\n" + b"y" * 4096 + b"\r\n") == [
        Command("a", "APPEND", (b"x", (), None, b"y" * 4096))
    ]
    p = CommandParser(max_line=256, max_literal=100_000, literal_plus=False)
    events = p.feed(b"a APPEND x {4097+}\r\n" + b"y" * 4097 + b"\r\nb NOOP\r\n")
    assert isinstance(events[0], TooBig) and events[0].status == "BAD"
    assert events[1:] == [Command("b", "NOOP")]
    # Synchronizing literals are still fine up to max_literal.
    assert p.feed(b"a APPEND x {5000}\r\n") == [NeedContinuation("a", 5000)]


def test_total_command_size_bounded():
    p = CommandParser(max_line=256, max_literal=1000, max_command=1500)
    assert p.feed(b"a LOGIN {200}\r\n") == [NeedContinuation("a", 200)]
    p = CommandParser(max_line=256, max_literal=1000, max_small_literal=1000, max_command=1500)
    events = p.feed(b"a LOGIN {900+}\r\n" + b"u" * 900 + b" {900+}\r\n" + b"p" * 900 + b"\r\nb NOOP\r\n")
    assert isinstance(events[0], TooBig) and "command too large" in events[0].text
    assert events[1:] == [Command("b", "NOOP")]


def test_overlong_line_refused_and_parser_recovers():
    p = parser()
    events = p.feed(b"a1 LOGIN " + b"x" * 1_000_000 + b"\r\nb NOOP\r\n")
    assert events == [Bad("a1", "line too long", "LIMIT"), Command("b", "NOOP")]
    assert p.buffered() == 0


def test_overlong_line_fed_in_chunks_stays_bounded():
    p = parser()
    events = []
    events += p.feed(b"a1 SEARCH ")
    for _ in range(1000):
        events += p.feed(b"(" * 1000)
        assert p.buffered() <= MAX_LINE
    events += p.feed(b"\r\nb NOOP\r\n")
    assert events == [Bad("a1", "line too long", "LIMIT"), Command("b", "NOOP")]


def test_overlong_line_ending_in_nonsync_literal_skips_it():
    p = parser()
    events = p.feed(b"a LOGIN " + b"x" * 1000 + b" {5+}\r\n)(\r\n\r\nb NOOP\r\n")
    assert events == [Bad("a", "line too long", "LIMIT"), Command("b", "NOOP")]


def test_deep_nesting_refused():
    wire = b"a SEARCH " + b"(" * 10_000 + b"SEEN" + b")" * 10_000 + b"\r\n"
    p = CommandParser(max_line=100_000, max_depth=16)
    (ev,) = p.feed(wire)
    assert ev == Bad("a", "nested too deeply", "LIMIT")
    assert parse_one(b"a SEARCH " + b"NOT " * 17 + b"SEEN\r\n", max_depth=16).text == "nested too deeply"
    assert parse_one(b"a SEARCH " + b"NOT " * 15 + b"SEEN\r\n", max_depth=16).name == "SEARCH"
    # Within the default line limit the line bound catches it first.
    assert CommandParser().feed(wire)[0].text == "line too long"


def test_too_many_args_refused():
    wire = b"a STORE 1 FLAGS (" + b" ".join(b"k%d" % i for i in range(50)) + b")\r\n"
    assert parse_one(wire, max_args=49) == Bad("a", "too many arguments", "LIMIT")
    assert parse_one(wire, max_args=50).name == "STORE"


def test_bare_newlines_refused():
    p = parser()
    assert p.feed(b"a NOOP\nb NOOP\r\n") == [Bad("a", "line not ended by CRLF"), Command("b", "NOOP")]


# ---- modes ----------------------------------------------------------------------------------------------------------


def test_idle_done():
    p = parser()
    assert p.feed(b"i IDLE\r\n") == [Command("i", "IDLE")]
    assert p.idling
    assert p.feed(b"done\r\na NOOP\r\n") == [IdleDone("i"), Command("a", "NOOP")]
    p.feed(b"i IDLE\r\n")
    assert p.feed(b"NOOP\r\n") == [Bad("i", "expected DONE")]
    assert p.feed(b"a NOOP\r\n") == [Command("a", "NOOP")]
    p.feed(b"i IDLE\r\n")
    p.end_idle()
    assert p.feed(b"a NOOP\r\n") == [Command("a", "NOOP")]


def test_authenticate_continuation_lines():
    p = parser()
    assert p.feed(b"s AUTHENTICATE PLAIN\r\n") == [Command("s", "AUTHENTICATE", ("PLAIN", None))]
    assert p.authenticating
    assert p.feed(b"AGpvZQBwYXNz\r\n") == [ContinuationLine("s", b"AGpvZQBwYXNz")]
    p.end_authenticate()
    assert p.feed(b"a NOOP\r\n") == [Command("a", "NOOP")]


def test_reset_drops_pipelined_plaintext():
    p = parser()
    events = p.feed(b"a STARTTLS\r\nb LOGIN joe {5}\r\n")
    assert events[0] == Command("a", "STARTTLS")
    p.reset()
    assert p.buffered() == 0
    assert p.feed(b"c NOOP\r\n") == [Command("c", "NOOP")]


# ---- properties -----------------------------------------------------------------------------------------------------

CORPUS = b"".join(v[0] for v in VALID if b"IDLE" not in v[0] and b"AUTHENTICATE" not in v[0])


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for c in [*points, len(data)]:
        pieces.append(data[last:c])
        last = c
    return pieces


def feed_all(p: CommandParser, pieces: list[bytes]) -> list:
    events = []
    for piece in pieces:
        events += p.feed(piece)
    return events


def test_byte_by_byte_equals_at_once():
    data = CORPUS + b"a LOGIN " + b"x" * 1000 + b"\r\nb LOGIN {5000}\r\nc APPEND x {9999+}\r\n" + b"z" * 9999 + b"\r\n"
    at_once = parser().feed(data)
    p = parser()
    one_by_one = feed_all(p, [data[i : i + 1] for i in range(len(data))])
    assert one_by_one == at_once
    assert sum(isinstance(e, Command) for e in at_once) == len(VALID) - 4


def _check_bounds(p: CommandParser) -> None:
    assert len(p._line) <= p.max_line
    assert len(p._cmd) <= p.max_command
    assert len(p._tail) <= 32


@PROPS
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=10))
def test_arbitrary_bytes_never_raise_and_stay_bounded(data, cuts):
    p = CommandParser(max_line=64, max_literal=128, max_depth=4, max_args=20)
    for piece in split_at(data, cuts):
        p.feed(piece)
        _check_bounds(p)


_TOKENS = [
    b"a",
    b" ",
    b"\r\n",
    b"(",
    b")",
    b"[",
    b"]",
    b"{3}\r\n",
    b"{3+}\r\n",
    b"{999999+}\r\n",
    b"{2}",
    b'"',
    b"\\",
    b"*",
    b"1:*",
    b"NOT ",
    b"OR ",
    b"FETCH ",
    b"SEARCH ",
    b"APPEND ",
    b"LOGIN ",
    b"IDLE",
    b"DONE",
    b"UID ",
    b"BODY[",
    b"<0.5>",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff",
]


@PROPS
@given(st.lists(st.sampled_from(_TOKENS), max_size=80), st.lists(st.integers(min_value=0), max_size=8))
def test_imap_shaped_noise_never_raises_and_splits_agree(tokens, cuts):
    data = b"".join(tokens)
    a = CommandParser(max_line=64, max_literal=128, max_depth=4, max_args=20)
    b = CommandParser(max_line=64, max_literal=128, max_depth=4, max_args=20)
    at_once = a.feed(data)
    _check_bounds(a)
    split = []
    for piece in split_at(data, cuts):
        split += b.feed(piece)
        _check_bounds(b)
    assert split == at_once


@PROPS
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_valid_corpus_any_split(cuts):
    expected = parser().feed(CORPUS)
    assert feed_all(parser(), split_at(CORPUS, cuts)) == expected


@PROPS
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_formatter_strings_round_trip(user, password):
    # Whatever the octets, the formatter's encoding parses back to them (NUL aside: IMAP4rev1 has no way to send it).
    user, password = user.replace(b"\x00", b""), password.replace(b"\x00", b"")
    wire = b"a LOGIN " + fmt.astring(user) + b" " + fmt.string(password) + b"\r\n"
    p = CommandParser(max_line=2048, max_small_literal=2048)
    events = [e for e in p.feed(wire) if not isinstance(e, NeedContinuation)]
    assert events == [Command("a", "LOGIN", (user, password))]


@PROPS
@given(
    st.lists(
        st.tuples(st.integers(1, 2**32 - 1) | st.none(), st.integers(1, 2**32 - 1) | st.none()), min_size=1, max_size=20
    ),
    st.lists(
        st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Junk", "work"]), max_size=5
    ),
)
def test_generated_store_round_trips(ranges, flags):
    def num(n):
        return b"*" if n is None else b"%d" % n

    seq = b",".join(num(lo) if lo == hi else num(lo) + b":" + num(hi) for lo, hi in ranges)
    wire = b"a UID STORE " + seq + b" +FLAGS.SILENT " + fmt.flag_list(flags) + b"\r\n"
    (ev,) = parser(max_line=1024).feed(wire)
    assert ev == Command("a", "STORE", (SequenceSet(tuple(ranges)), StoreAction("+", True), tuple(flags)), True)


@PROPS
@given(st.datetimes(min_value=datetime.datetime(1000, 1, 1), timezones=st.just(UTC1)))
def test_date_time_round_trips(when):
    when = when.replace(microsecond=0)
    (ev,) = [e for e in parser().feed(b"a APPEND x " + fmt.date_time(when) + b" {1+}\r\nm\r\n")]
    assert ev.args[2] == when


# ---- formatter ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("INBOX", b'"INBOX"'),
        ('a"b\\c', b'"a\\"b\\\\c"'),
        ("", b'""'),
        ("a\r\nb", b"{4}\r\na\r\nb"),
        (b"nul\x00", b"{4}\r\nnul\x00"),
        ("é", b"{2}\r\n\xc3\xa9"),
        ("x" * 2000, b"{2000}\r\n" + b"x" * 2000),
    ],
)
def test_string_encoding(value, wire):
    assert fmt.string(value) == wire


def test_astring_and_nstring():
    assert fmt.astring("INBOX") == b"INBOX"
    assert fmt.astring("nil") == b'"nil"'
    assert fmt.astring("a b") == b'"a b"'
    assert fmt.astring("") == b'""'
    assert fmt.nstring(None) == b"NIL"
    assert fmt.nil_or_string("NIL") == b'"NIL"'


def test_status_lines_cannot_be_injected():
    assert fmt.tagged("a1", "OK", "done\r\n* 1 EXISTS") == b"a1 OK done* 1 EXISTS\r\n"
    assert fmt.tagged("a1", "NO", "over", "OVERQUOTA") == b"a1 NO [OVERQUOTA] over\r\n"
    assert fmt.tagged("a1", "OK", "x", "APPENDUID 38505 3955") == b"a1 OK [APPENDUID 38505 3955] x\r\n"
    assert fmt.untagged_status("OK", "hi", "x] y\r\n") == b"* OK [x y] hi\r\n"
    assert fmt.continuation("go\r\nahead") == b"+ goahead\r\n"
    with pytest.raises(ValueError):
        fmt.tagged("a b", "OK", "x")
    with pytest.raises(ValueError):
        fmt.tagged("+", "OK", "x")
    with pytest.raises(ValueError):
        fmt.tagged("a", "BYE", "x")


def test_untagged_values():
    assert fmt.untagged(3, fmt.Atom("EXISTS")) == b"* 3 EXISTS\r\n"
    assert fmt.untagged(fmt.Atom("FLAGS"), [fmt.Atom("\\Seen"), fmt.Atom("$Junk")]) == b"* FLAGS (\\Seen $Junk)\r\n"
    assert (
        fmt.untagged(
            fmt.Atom("LIST"),
            [fmt.Atom("\\HasNoChildren"), fmt.Atom("\\Sent")],
            "/",
            fmt.Raw(fmt.mailbox("Gesendete Objekte")),
        )
        == b'* LIST (\\HasNoChildren \\Sent) "/" "Gesendete Objekte"\r\n'
    )
    assert fmt.untagged(fmt.Atom("ID"), None) == b"* ID NIL\r\n"
    with pytest.raises(ValueError):
        fmt.untagged(fmt.Atom("a b"))
    with pytest.raises(TypeError):
        fmt.value(1.5)


def test_envelope():
    addr = fmt.address("Joe Q.", None, "joe", "example.com")
    env = fmt.envelope(
        "Mon, 1 Jan 2024 00:00:00 +0000", 'hi "there"', [addr], [addr], [addr], [addr], None, None, None, "<id@x>"
    )
    assert env == (
        b'("Mon, 1 Jan 2024 00:00:00 +0000" "hi \\"there\\"" (("Joe Q." NIL "joe" "example.com")) '
        b'(("Joe Q." NIL "joe" "example.com")) (("Joe Q." NIL "joe" "example.com")) (("Joe Q." NIL "joe" "example.com")) '
        b'NIL NIL NIL "<id@x>")'
    )


# ---- mailbox names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("INBOX", b"INBOX"),
        ("Entwürfe", b"Entw&APw-rfe"),
        ("A & B", b"A &- B"),
        ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("😀", b"&2D3eAA-"),
    ],
)
def test_mailbox_name_examples(name, wire):
    assert encode_mailbox_name(name) == wire
    assert decode_mailbox_name(wire) == name


@pytest.mark.parametrize(
    "wire",
    [b"&", b"&Jjo", b"&AGE-", b"&Jjo-&Jjo-", b"&Jj!-", b"caf\xc3\xa9", b"a\tb", b"&2D0-", b"&APy-", b"x" * 1025],
)
def test_mailbox_name_refusals(wire):
    with pytest.raises(MailboxNameError):
        decode_mailbox_name(wire)


@PROPS
@given(st.text(max_size=100))
def test_mailbox_names_round_trip(name):
    wire = encode_mailbox_name(name)
    assert all(0x20 <= c <= 0x7E for c in wire)
    assert decode_mailbox_name(wire) == name
