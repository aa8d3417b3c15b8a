"""A stored message as IMAP FETCH sees it: header and body sections, MIME parts,
ENVELOPE and BODYSTRUCTURE (RFC 3501 §6.4.5, §7.4.2). Sans-I/O: bytes in.

The MIME walk works on the raw octets (so BODY[1.2] returns exactly what was
stored), with bounds: at most `MAX_PARTS` parts and `MAX_DEPTH` levels; deeper
structure is treated as an opaque leaf.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field

from mailwarden.protocol.imap.commands import Section
from mailwarden.protocol.imap.formatter import Raw, address, envelope, plist, value

MAX_PARTS = 500
MAX_DEPTH = 20

_PARAM = re.compile(rb';\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header block including the blank line, body). A message without a blank line is all header."""
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 4], data[end + 4 :]


def header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """(name, raw field including its CRLF and continuation lines), in order."""
    out: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n")[:-1]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + line + b"\r\n")
            continue
        name = line.split(b":", 1)[0].strip()
        out.append((name, line + b"\r\n"))
    return out


def header_value(header: bytes, name: str) -> bytes | None:
    """The first `name:` field's value, unfolded, or None."""
    want = name.lower().encode()
    for key, raw in header_fields(header):
        if key.lower() == want:
            v = raw.split(b":", 1)[1] if b":" in raw else b""
            return b" ".join(v.split()) if v.strip() else b""
    return None


def select_fields(header: bytes, names: tuple[str, ...], exclude: bool) -> bytes:
    """HEADER.FIELDS / HEADER.FIELDS.NOT: the matching fields and a closing blank line."""
    wanted = {n.lower().encode() for n in names}
    kept = [raw for key, raw in header_fields(header) if (key.lower() in wanted) != exclude]
    return b"".join(kept) + b"\r\n"


@dataclass
class Part:
    header: bytes  # the MIME header block (with its blank line); b"" for an implicit part
    body: bytes
    maintype: str = "text"
    subtype: str = "plain"
    params: dict[str, str] = field(default_factory=dict)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None  # the encapsulated message of a message/rfc822 part

    @property
    def raw(self) -> bytes:
        return self.header + self.body


def _params(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, val in _PARAM.findall(raw):
        if val.startswith(b'"'):
            val = re.sub(rb"\\(.)", rb"\1", val[1:-1])
        out.setdefault(name.decode("ascii").lower(), val.decode("utf-8", "replace"))
    return out


def parse(
    data: bytes, default: tuple[str, str] = ("text", "plain"), depth: int = 0, budget: list[int] | None = None
) -> Part:
    budget = [MAX_PARTS] if budget is None else budget
    budget[0] -= 1
    header, body = split_header(data)
    part = Part(header, body, *default)
    ctype = header_value(header, "Content-Type")
    if ctype:
        main, _, rest = ctype.partition(b";")
        kind, _, sub = main.strip().partition(b"/")
        if kind and sub:
            part.maintype = kind.decode("ascii", "replace").lower()
            part.subtype = sub.decode("ascii", "replace").strip().lower()
        part.params = _params(b";" + rest)
    if depth >= MAX_DEPTH or budget[0] <= 0:
        return part
    if part.maintype == "multipart" and part.params.get("boundary"):
        child_default = ("message", "rfc822") if part.subtype == "digest" else ("text", "plain")
        for chunk in _split_multipart(body, part.params["boundary"].encode("utf-8", "replace")):
            if budget[0] <= 0:
                break
            part.children.append(parse(chunk, child_default, depth + 1, budget))
        if not part.children:
            part.children.append(Part(b"", b""))
    elif part.maintype == "message" and part.subtype == "rfc822":
        part.message = parse(body, ("text", "plain"), depth + 1, budget)
    return part


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    delim = b"--" + boundary
    lines = body.split(b"\r\n")
    chunks: list[list[bytes]] = []
    current: list[bytes] | None = None
    for line in lines:
        stripped = line.rstrip(b" \t")
        if stripped == delim + b"--":
            if current is not None:
                chunks.append(current)
            current = None
            break
        if stripped == delim:
            if current is not None:
                chunks.append(current)
            current = []
            continue
        if current is not None:
            current.append(line)
    else:
        if current is not None:
            chunks.append(current)
    # The CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
    return [b"\r\n".join(c) for c in chunks]


def find_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """Part `1.2.3` of a message (a non-multipart message's only part is 1)."""
    part = root
    for n in numbers:
        if part.message is not None and part is not root:
            part = part.message
        if part.children:
            if n > len(part.children):
                return None
            part = part.children[n - 1]
        elif n != 1:
            return None
    return part


def section_bytes(data: bytes, section: Section) -> bytes | None:
    """The octets of BODY[section], or None when the part does not exist."""
    root = parse(data)
    target = root if not section.part else find_part(root, section.part)
    if target is None:
        return None
    text = section.text
    if section.part and text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"):
        # BODY[1.HEADER]: the header of the message/rfc822 part 1
        if target.message is None:
            return b""
        target = target.message
    if text is None:
        return data if not section.part else target.body
    if text == "MIME":
        return target.header
    header, body = (target.header, target.body)
    if text == "HEADER":
        return header
    if text == "TEXT":
        return body
    return select_fields(header, section.fields, exclude=text == "HEADER.FIELDS.NOT")


# ---- ENVELOPE and BODYSTRUCTURE ---------------------------------------------------------------------------------


def _addresses(raw: bytes | None) -> list[Raw] | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", "surrogateescape")
    out = []
    for name, addr in email.utils.getaddresses([text]):
        if not addr and not name:
            continue
        mailbox, _, host = addr.rpartition("@") if "@" in addr else (addr, "", "")
        out.append(address(_enc(name) or None, None, _enc(mailbox) or None, _enc(host) or None))
    return out or None


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def envelope_of(header: bytes) -> Raw:
    def h(name: str) -> bytes | None:
        return header_value(header, name)

    from_ = _addresses(h("From"))
    sender = _addresses(h("Sender")) or from_
    reply_to = _addresses(h("Reply-To")) or from_
    return envelope(
        h("Date"),
        h("Subject"),
        from_,
        sender,
        reply_to,
        _addresses(h("To")),
        _addresses(h("Cc")),
        _addresses(h("Bcc")),
        h("In-Reply-To"),
        h("Message-ID"),
    )


def _upper(s: str) -> bytes:
    return value(s.upper())


def _param_list(params: dict[str, str]) -> bytes:
    if not params:
        return b"NIL"
    items: list[object] = []
    for k, v in params.items():
        items += [k.upper(), v]
    return plist(items)


def body_structure(part: Part, extensible: bool = True) -> bytes:
    """BODYSTRUCTURE (extensible) or BODY of a part."""
    if part.children:
        inner = b"".join(body_structure(c, extensible) for c in part.children)
        out = b"(" + inner + b" " + _upper(part.subtype)
        if extensible:
            out += b" " + _param_list(part.params) + b" NIL NIL NIL"
        return out + b")"
    h = part.header
    cid = header_value(h, "Content-ID")
    desc = header_value(h, "Content-Description")
    enc = (header_value(h, "Content-Transfer-Encoding") or b"7BIT").strip().upper() or b"7BIT"
    params = dict(part.params)
    if part.maintype == "text" and "charset" not in params:
        params["charset"] = "us-ascii"
    fields = [
        _upper(part.maintype),
        _upper(part.subtype),
        _param_list(params),
        value(cid),
        value(desc),
        value(enc.decode("ascii", "replace")),
        b"%d" % len(part.body),
    ]
    lines = part.body.count(b"\n") + (1 if part.body and not part.body.endswith(b"\n") else 0)
    if part.message is not None:
        fields += [envelope_of(part.message.header), body_structure(part.message, extensible), b"%d" % lines]
    elif part.maintype == "text":
        fields.append(b"%d" % lines)
    if extensible:
        fields += [b"NIL", b"NIL", b"NIL", b"NIL"]  # md5, disposition, language, location
    return b"(" + b" ".join(fields) + b")"


__all__ = [
    "Part",
    "body_structure",
    "envelope_of",
    "find_part",
    "header_value",
    "parse",
    "section_bytes",
    "select_fields",
    "split_header",
]
