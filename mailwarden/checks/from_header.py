"""The RFC5322.From author domain for DMARC, parsed strictly.

DMARC protects exactly one thing: the domain a reader sees in From. If our
parser and the reader's mail client can disagree about that domain, DMARC
authenticates one domain while the reader trusts another. "Composition Kills"
(Chen et al., USENIX Security 2020) lists the ways they disagree: two From
headers, `From :` with a space, several addresses, encoded-words and routes
in the address, quotes and comments that hide a second address. Rather than
pick one reading, `parse_author` refuses every such message with a
`FromHeaderError`, which the pipeline answers with 550 5.7.1 (RFC 7489 §6.6.1
lets a receiver reject mail whose author domain cannot be determined).

What is accepted is RFC 5322 §3.4 `mailbox` (plus the §4.4 obsolete empty
list elements), RFC 6532 UTF-8, and nothing else: exactly one From header,
exactly one mailbox, a dot-atom domain that is a valid host name.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import idna


class FromHeaderError(Exception):
    """The author domain cannot be determined without ambiguity; the pipeline replies 550 5.7.1."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AuthorDomain:
    domain: str  # lower-case, IDNA A-labels: the DMARC RFC5322.From domain
    address: str  # local@domain, local part as written
    display_name: str = ""  # as written (quotes removed, encoded-words not decoded)


def parse_author(header_block: bytes) -> AuthorDomain:
    """The author of a message from its header block (a whole message works too)."""
    values = [value for name, value in _header_fields(header_block) if _is_from(name)]
    if not values:
        raise FromHeaderError("no From header")
    if len(values) > 1:
        raise FromHeaderError(f"{len(values)} From headers")
    return parse_from_value(values[0])


def parse_from_value(value: bytes) -> AuthorDomain:
    """One From header's unfolded value."""
    text = value.decode("utf-8", "surrogateescape").strip(" \t")
    if _CONTROL_RE.search(text):
        raise FromHeaderError("control character in From header")
    tokens = _tokenize(text)
    if any(t.kind == "special" and t.text in ":;" for t in tokens):
        if _has_route(tokens):
            raise FromHeaderError("source route in From address")
        raise FromHeaderError("group syntax in From header")
    elements: list[list[_Token]] = [[]]
    for t in tokens:
        if t.kind == "special" and t.text == ",":
            elements.append([])
        else:
            elements[-1].append(t)
    # RFC 5322 §4.4 obs-mbox-list: empty elements (only CFWS) are allowed and ignored.
    mailboxes = [e for e in elements if any(t.kind != "comment" for t in e)]
    if not mailboxes:
        raise FromHeaderError("no address in From header")
    if len(mailboxes) > 1:
        raise FromHeaderError(f"{len(mailboxes)} addresses in From header")
    return _mailbox(text, mailboxes[0])


# ---- header fields ------------------------------------------------------------------

_LINE_BREAK_RE = re.compile(rb"\r\n|\n|\r")
_NAME_JUNK_RE = re.compile(rb"[\x00-\x20\x7f]")


def _header_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """(name, unfolded value) for each field up to the first empty line.

    A bare CR or LF counts as a line break too: some clients break lines there,
    so a From hidden behind one must be seen (and then counted as a second From).
    """
    fields: list[tuple[bytes, bytearray]] = []
    current: bytearray | None = None
    for line in _lines(block):
        if line == b"":
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current += line  # RFC 5322 §2.2.3: unfolding removes only the CRLF
                continue
            # A continuation with nothing to continue: a client may read it as a field.
            line = line.lstrip(b" \t")
        name, colon, rest = line.partition(b":")
        if not colon:
            current = None
            continue
        current = bytearray(rest)
        fields.append((name, current))
    return [(name, bytes(value)) for name, value in fields]


def _lines(block: bytes) -> Iterator[bytes]:
    """Lines, lazily: a whole message may be passed, and only its header is read."""
    pos = 0
    for m in _LINE_BREAK_RE.finditer(block):
        yield block[pos : m.start()]
        pos = m.end()
    yield block[pos:]


def _is_from(name: bytes) -> bool:
    # "From :" and names with stray control bytes are From to some parsers, so to us too.
    return _NAME_JUNK_RE.sub(b"", name).lower() == b"from"


# ---- tokens (RFC 5322 §3.2) -------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SPECIALS = '()<>[]:;@\\,."'
_ENCODED_WORD_RE = re.compile(r"=\?[^?\s]+\?[bq]\?[^?\s]*\?=", re.IGNORECASE)


@dataclass(frozen=True)
class _Token:
    kind: str  # atom, qstring, comment, literal, special
    text: str  # atom text; qstring/comment/literal content without delimiters; the special char
    start: int
    end: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif c == "(":
            i = _comment(text, i, tokens)
        elif c == '"':
            i = _quoted(text, i, tokens)
        elif c == "[":
            end = text.find("]", i)
            if end < 0:
                raise FromHeaderError("unterminated domain literal in From header")
            tokens.append(_Token("literal", text[i + 1 : end], i, end + 1))
            i = end + 1
        elif c in ")]\\":
            raise FromHeaderError(f"stray {c!r} in From header")
        elif c in _SPECIALS:
            tokens.append(_Token("special", c, i, i + 1))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in " \t":
                j += 1
            tokens.append(_Token("atom", text[i:j], i, j))
            i = j
    return tokens


def _comment(text: str, i: int, tokens: list[_Token]) -> int:
    depth, j, out = 0, i, []
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            out.append(text[j + 1])
            j += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                tokens.append(_Token("comment", "".join(out[1:]), i, j + 1))
                return j + 1
        out.append(c)
        j += 1
    raise FromHeaderError("unbalanced parenthesis in From header")


def _quoted(text: str, i: int, tokens: list[_Token]) -> int:
    j, out = i + 1, []
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            out.append(text[j + 1])
            j += 2
            continue
        if c == '"':
            tokens.append(_Token("qstring", "".join(out), i, j + 1))
            return j + 1
        out.append(c)
        j += 1
    raise FromHeaderError("unterminated quoted string in From header")


def _has_route(tokens: list[_Token]) -> bool:
    """RFC 5322 §4.4 obs-route: `<@a.test,@b.test:user@c.test>`."""
    return any(_is(a, "<") and _is(b, "@") for a, b in itertools.pairwise(tokens))


# ---- mailbox (RFC 5322 §3.4) ------------------------------------------------------------


def _is(token: _Token, char: str) -> bool:
    return token.kind == "special" and token.text == char


def _mailbox(text: str, tokens: list[_Token]) -> AuthorDomain:
    for t in tokens:
        # A comment or display name holding an address is what a lenient reader may show.
        if t.kind == "comment" and any(c in t.text for c in "@<>"):
            raise FromHeaderError("address-like text in a From comment")
    opens = [k for k, t in enumerate(tokens) if _is(t, "<")]
    closes = [k for k, t in enumerate(tokens) if _is(t, ">")]
    if not opens and not closes:
        inner = list(tokens)
        while inner and inner[0].kind == "comment":
            inner.pop(0)
        while inner and inner[-1].kind == "comment":
            inner.pop()
        return AuthorDomain(*_addr_spec(text, inner), display_name="")
    if len(opens) != 1 or len(closes) != 1 or opens[0] > closes[0]:
        raise FromHeaderError("mismatched angle brackets in From header")
    lt, gt = opens[0], closes[0]
    if any(t.kind != "comment" for t in tokens[gt + 1 :]):
        raise FromHeaderError("text after the address in From header")
    phrase = [t for t in tokens[:lt] if t.kind != "comment"]
    for t in phrase:
        # RFC 5322 §3.2.5 phrase (with §4.1 obs-phrase dots): words only, so an @ here is not a name.
        if not (t.kind in ("atom", "qstring") or _is(t, ".")):
            raise FromHeaderError(f"{t.text!r} in the From display name")
    display = " ".join(t.text for t in phrase).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return AuthorDomain(*_addr_spec(text, tokens[lt + 1 : gt]), display_name=display)


def _addr_spec(text: str, tokens: list[_Token]) -> tuple[str, str]:
    """(domain, address) of RFC 5322 §3.4.1 addr-spec tokens."""
    if not tokens:
        raise FromHeaderError("empty address in From header")
    raw = text[tokens[0].start : tokens[-1].end]
    if _ENCODED_WORD_RE.search(raw):
        raise FromHeaderError("encoded-word in the From address")  # RFC 2047 §5 forbids it there
    if any(t.kind == "comment" for t in tokens):
        raise FromHeaderError("comment inside the From address")
    ats = [k for k, t in enumerate(tokens) if _is(t, "@")]
    if len(ats) != 1:
        raise FromHeaderError("From address has no @" if not ats else "From address has more than one @")
    local_tokens, domain_tokens = tokens[: ats[0]], tokens[ats[0] + 1 :]
    local = _local_part(local_tokens)
    domain = _domain(domain_tokens)
    return domain, f"{local}@{domain}"


def _local_part(tokens: list[_Token]) -> str:
    if not tokens:
        raise FromHeaderError("From address has an empty local part")
    out: list[str] = []
    for k, t in enumerate(tokens):
        expect_word = k % 2 == 0
        if expect_word and t.kind == "atom":
            out.append(t.text)
        elif expect_word and t.kind == "qstring":
            if any(c in t.text for c in '@<>,;:"\\'):
                raise FromHeaderError("quoted local part that hides an address")
            out.append('"' + t.text + '"')
        elif not expect_word and _is(t, "."):
            out.append(".")
        else:
            raise FromHeaderError(f"{t.text!r} in the From local part")
    if len(tokens) % 2 == 0:
        raise FromHeaderError("From local part ends with a dot")
    local = "".join(out)
    if any("\udc80" <= c <= "\udcff" for c in local):
        raise FromHeaderError("From local part is not UTF-8")
    return local


_LDH_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _domain(tokens: list[_Token]) -> str:
    if not tokens:
        raise FromHeaderError("From address has no domain")
    labels: list[str] = []
    for k, t in enumerate(tokens):
        if t.kind == "literal":
            raise FromHeaderError("From address has a domain literal")  # DMARC needs a domain name
        if k % 2 == 0 and t.kind == "atom":
            labels.append(t.text)
        elif k % 2 == 1 and _is(t, "."):
            continue
        else:
            raise FromHeaderError(f"{t.text!r} in the From domain")
    if len(tokens) % 2 == 0:
        raise FromHeaderError("From domain ends with a dot")
    try:
        return normalize_domain(".".join(labels))
    except ValueError as exc:
        raise FromHeaderError(f"From domain {exc}") from None


def normalize_domain(domain: str) -> str:
    """Lower-case IDNA A-label form of a host name; ValueError if it is not one.

    Requires at least two labels and a non-numeric top-level label: an author
    domain must be something DMARC can look up.
    """
    domain = domain.strip().rstrip(".")
    try:
        if not domain.isascii():
            domain = idna.encode(domain, uts46=True).decode("ascii")
        domain = domain.lower()
        labels = domain.split(".")
        for label in labels:
            if not _LDH_RE.match(label):
                raise ValueError(f"{domain!r} is not a host name")
            if label.startswith("xn--"):
                idna.decode(label)  # refuses punycode that no U-label produces
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(f"{domain!r} is not a valid IDNA name ({exc})") from None
    if len(labels) < 2 or labels[-1].isdigit() or len(domain) > 253:
        raise ValueError(f"{domain!r} is not a fully qualified domain name")
    return domain
