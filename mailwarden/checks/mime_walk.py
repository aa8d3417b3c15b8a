"""One bounded walk of a message's MIME tree, for every check that needs the parts.

The attachment limits (outbound/limits.py), the attachment rules
(checks/attachments.py) and strip-and-notify (pipeline/strip.py) all need the
same facts about each leaf part: where it is, its type, its file name, its
encoded size and, sometimes, its decoded bytes. Parsing is the expensive part
on the hot path, so it happens once here, and it is bounded because the input
is hostile:

* the parser sees at most `max_bytes` of the message, cut after
  `max_parts` structure lines (delimiters and Content-Type fields), with
  Content-* fields shortened to a few parameters (body_links.py measured why:
  the stdlib header parser is super-linear on hostile parameter lists);
* the tree is walked by us, not by `Message.walk()`, so nesting deeper than
  `max_depth` is reported (`too_deep`) instead of recursed into;
* at most `max_parts` parts are visited (`truncated`);
* every call into the stdlib email package is guarded: on hostile input it
  raises IndexError, KeyError, LookupError, RecursionError and friends
  instead of registering a defect; a part that raises is reported as
  `unreadable`, never as an exception.

compat32 is used for the same reason as in body_links.py (15-50x faster than
policy.default on hostile headers, and we only need the tree). `shared_walk`
keeps the last message's walk, so the end-of-DATA limits and the content rules
parse a message once; the rewrite that bounds the parser runs only when a
C-speed scan finds something it would change.
"""

from __future__ import annotations

import binascii
import email
import email.errors
import email.policy
import re
from dataclasses import dataclass, field
from email.message import Message

MAX_BYTES = 64 << 20  # the parser sees at most this much (smtp.max_message_size is smaller by default)
MAX_PARTS = 200
MAX_DEPTH = 20  # multipart and message/rfc822 nesting
_MAX_MIME_FIELD = 512
_MAX_MIME_PARAMS = 8

PARSE_ERRORS: tuple[type[BaseException], ...] = (
    IndexError,
    KeyError,
    LookupError,  # unknown charset
    ValueError,  # includes UnicodeError and binascii.Error
    TypeError,
    AttributeError,
    AssertionError,
    RecursionError,
    binascii.Error,
    email.errors.MessageError,
)

_MIME_FIELD = re.compile(
    rb"(?im)^(content-(?:type|disposition|transfer-encoding)[ \t]*:)([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)"
)
_STRUCTURE = re.compile(rb"(?im)^(?:--|content-type[ \t]*:)")


@dataclass
class Part:
    """One leaf part (or one unreadable spot) of the tree."""

    index: int  # position in the walk (0 = the top level)
    depth: int  # 0 = the top level, 1 = a child of the top multipart, ...
    content_type: str  # lower-case maintype/subtype ("application/octet-stream" if unreadable)
    filename: str  # "" when the part names no file
    disposition: str  # "attachment", "inline" or ""
    encoding: str  # Content-Transfer-Encoding, lower-case
    encoded_size: int  # bytes of the payload as transmitted
    unreadable: bool = False  # the parser raised on this part
    message: Message | None = field(default=None, repr=False)

    @property
    def decoded_size_estimate(self) -> int:
        """The decoded size without decoding: base64 is 4/3 of the data."""
        return self.encoded_size * 3 // 4 if self.encoding == "base64" else self.encoded_size

    @property
    def is_attachment(self) -> bool:
        """A part that names a file, says attachment, or is not text (the body alternatives are text)."""
        if self.unreadable or self.filename or self.disposition == "attachment":
            return True
        if self.index == 0:
            return False  # a single-part non-MIME body is the message, not an attachment
        return self.content_type.split("/")[0] not in ("text", "message", "multipart")

    def payload(self, max_bytes: int) -> bytes | None:
        """The decoded payload, or None when it would exceed `max_bytes` or cannot be decoded."""
        if self.message is None or self.decoded_size_estimate > max_bytes:
            return None
        try:
            data = self.message.get_payload(decode=True)
        except PARSE_ERRORS:
            return None
        if not isinstance(data, bytes) or len(data) > max_bytes:
            return None
        return data


@dataclass
class Walk:
    parts: list[Part]
    truncated: bool = False  # more than max_parts, or the message was cut at max_bytes
    too_deep: bool = False  # nesting beyond max_depth was not entered
    unreadable: bool = False  # the top-level parse failed; parts is then one unreadable Part
    root: Message | None = field(default=None, repr=False)  # the parsed tree (pipeline/strip.py edits it)

    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.is_attachment]


def walk(message: bytes, *, max_parts: int = MAX_PARTS, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Walk:
    """The leaf parts of `message`, bounded as the module docstring says. Never raises."""
    visible = message[:max_bytes]
    cut = False
    if _needs_bounding(visible, max_parts):
        visible, cut = _cut(visible, max_parts)
        visible = _MIME_FIELD.sub(_short_field, visible)
    truncated = cut or len(message) > max_bytes
    try:
        msg = email.message_from_bytes(visible, policy=email.policy.compat32)
    except PARSE_ERRORS:
        return Walk([_unreadable(0, 0, len(message))], unreadable=True)
    result = Walk([], truncated=truncated, root=msg)
    counter = [0]
    _visit(msg, 0, result, counter, max_parts, max_depth)
    return result


_last: tuple[bytes, tuple[int, int, int], Walk] | None = None


def shared_walk(
    message: bytes, *, max_parts: int = MAX_PARTS, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES
) -> Walk:
    """`walk`, reused when the previous call was for the same bytes and bounds: the attachment limits
    (end of DATA) and the content rules (the data stage) read the same message, and the parse is the cost.

    The result is shared, so callers must not edit its tree (pipeline/strip.py calls `walk` for its own).
    One entry only: a message's tree is kept until the next message is walked.
    """
    global _last
    key = (max_parts, max_depth, max_bytes)
    last = _last
    if last is not None and last[1] == key and last[0] == message:
        return last[2]
    result = walk(message, max_parts=max_parts, max_depth=max_depth, max_bytes=max_bytes)
    _last = (message, key, result)
    return result


def _visit(msg: Message, depth: int, out: Walk, counter: list[int], max_parts: int, max_depth: int) -> None:
    if counter[0] >= max_parts:
        out.truncated = True
        return
    index = counter[0]
    counter[0] += 1
    try:
        children = msg.get_payload() if msg.is_multipart() else None
    except PARSE_ERRORS:
        out.parts.append(_unreadable(index, depth, 0))
        return
    if isinstance(children, list):
        if depth >= max_depth:
            out.too_deep = True
            return
        for child in children:
            if isinstance(child, Message):
                _visit(child, depth + 1, out, counter, max_parts, max_depth)
            if counter[0] >= max_parts:
                out.truncated = True
                return
        return
    try:
        raw = msg.get_payload(decode=False)
        size = len(raw) if isinstance(raw, (str, bytes)) else 0
        ctype = msg.get_content_type()
        filename = msg.get_filename() or msg.get_param("name") or ""
        if not isinstance(filename, str):
            filename = str(filename)
        disposition = str(msg.get("Content-Disposition") or "").split(";")[0].strip().lower()
        encoding = str(msg.get("Content-Transfer-Encoding", "")).strip().lower()
    except PARSE_ERRORS:
        out.parts.append(_unreadable(index, depth, 0))
        return
    out.parts.append(Part(index, depth, ctype, filename, disposition, encoding, size, message=msg))


def _unreadable(index: int, depth: int, size: int) -> Part:
    return Part(index, depth, "application/octet-stream", "", "", "", size, unreadable=True)


def bounded(message: bytes, max_parts: int) -> bytes:
    """The message cut to what the parser may see: its structure and its Content-* fields bounded."""
    return _MIME_FIELD.sub(_short_field, _cut(message, max_parts)[0])


def _needs_bounding(message: bytes, max_parts: int) -> bool:
    """False when a quick look (C-speed counts and finds) proves the regex rewrite would change nothing:
    few structure lines and every Content-* field short (folded or not). Ordinary mail takes this path;
    the rewrite cost ~2 ms on a 140 KB message."""
    lowered = message.lower()
    fields = lowered.count(b"content-")
    if fields + lowered.count(b"\n--") + 1 >= 2 * max_parts + 2:
        return True
    pos = lowered.find(b"content-")
    while pos >= 0:
        limit = pos + _MAX_MIME_FIELD
        end = lowered.find(b"\n", pos, limit)
        while end >= 0 and lowered[end + 1 : end + 2] in (b" ", b"\t"):  # a folded continuation line
            end = lowered.find(b"\n", end + 1, limit)
        if end < 0 or lowered.count(b";", pos, end) >= _MAX_MIME_PARAMS - 1:
            return True  # a long or parameter-heavy field (or one cut off): let the rewrite shorten it
        pos = lowered.find(b"content-", end)
    return False


def _cut(message: bytes, max_parts: int) -> tuple[bytes, bool]:
    for n, m in enumerate(_STRUCTURE.finditer(message)):
        if n >= 2 * max_parts + 2:  # a delimiter and a Content-Type per part, and the top level
            return message[: m.start()], True
    return message, False


def _short_field(m: re.Match[bytes]) -> bytes:
    value = re.sub(rb"\r?\n(?=[ \t])", b"", m.group(2))  # unfold
    if len(value) <= _MAX_MIME_FIELD and value.count(b";") < _MAX_MIME_PARAMS:
        return m.group(0)
    return m.group(1) + b";".join(value[:_MAX_MIME_FIELD].split(b";")[:_MAX_MIME_PARAMS])
