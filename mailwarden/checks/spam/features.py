"""What the spam classifier sees of a message: a bounded set of named features.

A feature is a short byte string with a prefix saying where it came from
(`subject:free`, `tag:font`, `url:example.org`, `att:ext:exe`, `img:canon`,
`auth:dkim=pass`, plain body words without a prefix). The model hashes them
(model.py); the names stay readable so `mailwarden inspect` can say which
ones drove a verdict.

The input is hostile, so everything is bounded: only the first
`max_bytes` of the message are parsed, at most `MAX_PARTS` MIME parts are
looked at, each decoded part is cut to `max_bytes`, image metadata is read
from the first `_IMAGE_SCAN` bytes of an image, and at most `MAX_FEATURES`
distinct features come out. The stdlib parser (compat32 policy, which has
none of the quadratic header parsing of the newer policies) runs inside a
catch-all: a message it chokes on still yields its header and raw-text
features, never an exception.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import re
import struct
from collections.abc import Iterable, Sequence
from email.message import Message

MAX_BYTES = 256 * 1024  # of the message that is parsed at all
MAX_PARTS = 40
MAX_FEATURES = 4000
_MAX_HEADERS = 200
_IMAGE_SCAN = 64 * 1024
_MAX_RECEIVED = 4

# Headers whose words are features (prefixed with the header name).
_WORD_HEADERS = {
    b"subject": b"subject:",
    b"from": b"from:",
    b"reply-to": b"reply-to:",
    b"to": b"to:",
    b"x-mailer": b"mailer:",
    b"user-agent": b"mailer:",
    b"content-type": b"ctype:",
    b"message-id": b"msgid:",
    b"received": b"rcvd:",
    b"list-id": b"list:",
    b"precedence": b"prec:",
    b"organization": b"org:",
}
_NUMBERS_ARE_NOISE = frozenset({b"received", b"message-id", b"x-mailer", b"user-agent"})
# Never features: verdicts written by other filters (or forged by the sender) and our own results.
_IGNORED_PREFIXES = (b"x-spam", b"authentication-results", b"x-mailwarden", b"arc-", b"x-virus")

_WORD = re.compile(rb"[a-z0-9$\x80-\xff][a-z0-9$'_\x80-\xff-]{1,24}")
_TAG = re.compile(rb"<\s*(/?)([a-z][a-z0-9]{0,15})\b([^<>]{0,400})>?")
_ATTR = re.compile(rb"([a-z-]{1,20})\s*=")
_URL = re.compile(rb"(?:https?://|www\.)([a-z0-9\x80-\xff.-]{1,253})(?::\d{1,5})?(/[^\s\"'<>]{0,200})?")
_IPV4 = re.compile(rb"^\d{1,3}(?:\.\d{1,3}){3}$")
_CHARSET = re.compile(rb"charset\s*=\s*\"?([a-z0-9_.:-]{1,40})")
_COMMENT = re.compile(rb"<!--.*?-->", re.DOTALL)
_ENTITY = re.compile(rb"&(#?[a-z0-9]{1,8});?")
_AUTH_PAIR = re.compile(r"\b(spf|dkim|dmarc|arc|iprev)=([a-z]+)")


def extract(message: bytes, auth: Iterable[tuple[str, str]] = (), max_bytes: int = MAX_BYTES) -> list[bytes]:
    """The message's distinct features (bounded; never raises on any input)."""
    out: set[bytes] = set()
    data = message[:max_bytes]
    if len(message) > max_bytes:
        out.add(b"meta:truncated")
    head, body = _split(data)
    try:
        _header_features(head, out)
    except Exception:  # pragma: no cover - defensive: header bytes are already bounded
        out.add(b"meta:bad_headers")
    try:
        _body_features(data, body, out, max_bytes)
    except Exception:  # the stdlib parser on hostile MIME: keep what the raw text says
        out.add(b"meta:bad_mime")
        _text_features(body[:max_bytes], out)
    out.add(b"meta:size:%d" % min(len(message).bit_length(), 26))
    for method, result in auth:
        out.add(f"auth:{method}={result}".encode("ascii", "replace"))
    if len(out) > MAX_FEATURES:
        return sorted(out)[:MAX_FEATURES]
    return list(out)


def auth_pairs(results: Sequence[object]) -> list[tuple[str, str]]:
    """(method, result) of the authentication checks (CheckResults) that ran before the classifier."""
    pairs = []
    for r in results:
        check, result = getattr(r, "check", ""), getattr(r, "result", "")
        if check in ("spf", "dkim", "dmarc", "arc", "from") and result and result != "off":
            pairs.append((check, result))
    return pairs


def auth_from_header(message: bytes, authserv_id: str) -> list[tuple[str, str]]:
    """The auth results our own Authentication-Results field (the first one, ours) recorded.

    Training events store the message as filed, so this recovers the same
    `auth:` features the classifier saw when the message arrived.
    """
    head, _ = _split(message[:MAX_BYTES])
    for name, value in _headers(head):
        if name == b"authentication-results":
            text = value.decode("ascii", "replace").lower()
            if text.split(";", 1)[0].strip() != authserv_id.lower():
                return []
            return sorted(set(_AUTH_PAIR.findall(text)))
    return []


def strip_own_trace(message: bytes, hostname: str) -> bytes:
    """A filed message as the classifier saw it at delivery: without the Return-Path, Received and
    Authentication-Results fields our own server put on top (the checks run before they are added)."""
    ours_by = b"by " + hostname.lower().encode("ascii", "replace")
    ours_ar = hostname.lower().encode("ascii", "replace") + b";"
    pos = 0
    for _ in range(8):
        end = message.find(b"\n", pos)
        while end >= 0 and message[end + 1 : end + 2] in (b" ", b"\t"):  # the field's folded lines
            end = message.find(b"\n", end + 1)
        if end < 0:
            break
        field = message[pos : end + 1]
        name, _, value = field.partition(b":")
        name = name.strip().lower()
        flat = b" ".join(value.lower().split())
        if (
            name == b"return-path"
            or (name == b"received" and ours_by in flat)
            or (name == b"authentication-results" and flat.startswith(ours_ar))
        ):
            pos = end + 1
        else:
            break
    return message[pos:]


def _split(data: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[: end + len(sep) // 2], data[end + len(sep) :]
    return data, b""


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """Unfolded (lower-case name, value) pairs, at most _MAX_HEADERS."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + b" " + line.strip())
            continue
        name, sep, value = line.partition(b":")
        if not sep or len(name) > 76:
            continue
        if len(fields) >= _MAX_HEADERS:
            break
        fields.append((name.strip().lower(), value.strip()))
    return fields


def _header_features(head: bytes, out: set[bytes]) -> None:
    received = 0
    for name, value in _headers(head):
        if name.startswith(_IGNORED_PREFIXES):
            continue
        out.add(b"h:" + name[:40])
        prefix = _WORD_HEADERS.get(name)
        if prefix is None:
            continue
        if name == b"received":
            received += 1
            if received > _MAX_RECEIVED:
                continue
        value = value[:2000]
        if b"=?" in value:
            value = _decode_words(value, out)
        lower = value.lower()
        noisy = name in _NUMBERS_ARE_NOISE
        for word in _WORD.findall(lower):
            if noisy and word.isdigit():  # times, dates, address octets, queue ids: they identify nothing
                continue
            out.add(prefix + word)
        if name == b"subject":
            letters = [c for c in value if 65 <= c <= 90 or 97 <= c <= 122]
            if len(letters) >= 8 and sum(1 for c in letters if c <= 90) / len(letters) > 0.6:
                out.add(b"meta:subject_caps")
            if b"!" in value:
                out.add(b"meta:subject_bang")
        elif name in (b"from", b"reply-to"):
            at = lower.rfind(b"@")
            if at >= 0:
                domain = lower[at + 1 :].split(b">", 1)[0].strip()[:100]
                out.add(prefix + b"@" + domain)
    out.add(b"meta:received:%d" % min(received, 10))


def _decode_words(value: bytes, out: set[bytes]) -> bytes:
    """RFC 2047 encoded-words decoded to UTF-8, their charsets kept as features."""
    try:
        decoded = []
        for text, charset in email.header.decode_header(value.decode("ascii", "replace")):
            if charset:
                out.add(b"hcharset:" + charset.lower().encode("ascii", "replace")[:30])
            if isinstance(text, bytes):
                text = text.decode(charset or "ascii", "replace") if _known(charset) else text.decode("latin-1")
            decoded.append(text)
        return "".join(decoded).encode("utf-8", "replace")
    except Exception:
        out.add(b"meta:bad_encoded_word")
        return value


def _known(charset: str | None) -> bool:
    import codecs

    if not charset:
        return True
    try:
        codecs.lookup(charset)
    except LookupError:
        return False
    return True


def _body_features(data: bytes, body: bytes, out: set[bytes], max_bytes: int) -> None:
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
    seen_text = seen_html = False
    parts = 0
    for part in _walk(msg):
        parts += 1
        if parts > MAX_PARTS:
            out.add(b"meta:many_parts")
            break
        ctype = part.get_content_type().lower()[:60]
        out.add(b"ct:" + ctype.encode("ascii", "replace"))
        if part.is_multipart():
            continue
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()[:20]
        if cte:
            out.add(b"cte:" + cte.encode("ascii", "replace"))
        filename = _filename(part)
        if filename:
            _attachment_features(filename, ctype, out)
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        payload = payload[:max_bytes]
        charset = part.get_content_charset()
        if charset:
            out.add(b"charset:" + charset.encode("ascii", "replace")[:30])
        if ctype == "text/html":
            seen_html = True
            _html_features(payload, out)
        elif ctype.startswith("text/") and not filename:
            seen_text = True
            _text_features(payload, out)
        elif ctype.startswith("image/"):
            _image_features(payload, out)
        if filename or not ctype.startswith("text/"):
            out.add(b"meta:attsize:%d" % min(len(payload).bit_length(), 26))
    if seen_html and not seen_text:
        out.add(b"meta:html_only")
    if not seen_html and not seen_text:
        out.add(b"meta:no_text")
    out.add(b"meta:parts:%d" % min(parts, 10))


def _walk(msg: Message) -> Iterable[Message]:
    """Message.walk without recursion into absurd depths (the parser bounds nothing)."""
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        yield part
        if part.is_multipart() and depth < 8:
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((p, depth + 1) for p in reversed(payload[:MAX_PARTS]))


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except Exception:
        return "?"
    if not name:
        return ""
    return str(name)[:200]


def _attachment_features(filename: str, ctype: str, out: set[bytes]) -> None:
    lower = filename.lower().encode("utf-8", "replace")
    out.add(b"att")
    stem, dot, ext = lower.rpartition(b".")
    if dot:
        out.add(b"att:ext:" + ext[:10])
        if b"." in stem and stem.rpartition(b".")[2] in (b"pdf", b"doc", b"jpg", b"txt", b"xls"):
            out.add(b"att:double_ext")
    for word in _WORD.findall(lower):
        out.add(b"att:name:" + word)
    out.add(b"att:ct:" + ctype.encode("ascii", "replace"))


def _text_features(text: bytes, out: set[bytes]) -> None:
    lower = text.lower()
    out.update(_WORD.findall(lower))
    _url_features(lower, out)


def _html_features(html: bytes, out: set[bytes]) -> None:
    lower = _COMMENT.sub(b" ", html.lower())
    for closing, tag, rest in _TAG.findall(lower):
        if closing:
            continue
        out.add(b"tag:" + tag)
        for attr in _ATTR.findall(rest):
            out.add(b"attr:" + tag + b"." + attr)
        if tag == b"img":
            out.add(b"html:img")
        if b"display:none" in rest or b"visibility:hidden" in rest:
            out.add(b"html:hidden")
        if b"font" in tag and b"size" in rest:
            out.add(b"html:fontsize")
    _url_features(lower, out)
    text = _TAG.sub(b" ", lower)
    for ent in set(_ENTITY.findall(text)):
        out.add(b"ent:" + ent)
    out.update(_WORD.findall(text))


def _url_features(lower: bytes, out: set[bytes]) -> None:
    from mailwarden.dns.public_suffix import registrable_domain

    count = 0
    for host, path in _URL.findall(lower):
        count += 1
        if count > 100:
            break
        host = host.strip(b".")
        if not host:
            continue
        out.add(b"url:" + host[:100])
        if _IPV4.match(host):
            out.add(b"url:ip")
            continue
        try:
            domain = registrable_domain(host.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            domain = None
        if domain:
            out.add(b"urld:" + domain.encode("ascii", "replace"))
        if path:
            for word in _WORD.findall(path):
                out.add(b"urlp:" + word)
    out.add(b"meta:urls:%d" % min(count, 20).bit_length())


# ---- image metadata (EXIF, JPEG comments, PNG text chunks) ------------------------


def _image_features(data: bytes, out: set[bytes]) -> None:
    data = data[:_IMAGE_SCAN]
    texts: list[bytes] = []
    if data.startswith(b"\xff\xd8"):
        out.add(b"img:jpeg")
        texts = jpeg_texts(data)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        out.add(b"img:png")
        texts = png_texts(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        out.add(b"img:gif")
    for text in texts[:50]:
        out.add(b"img:meta")
        for word in _WORD.findall(text[:1000].lower()):
            out.add(b"img:" + word)


_EXIF_ASCII_TAGS = {0x010E, 0x010F, 0x0110, 0x0131, 0x013B, 0x8298, 0x9286, 0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F}


def jpeg_texts(data: bytes) -> list[bytes]:
    """Text from a JPEG's COM segments and EXIF (APP1) ASCII tags: bounded, never raises."""
    texts: list[bytes] = []
    pos = 2
    for _ in range(64):  # segments before the image data
        if pos + 4 > len(data) or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if length < 2:
            break
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xFE:
            texts.append(segment)
        elif marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            texts += exif_texts(segment[6:])
        pos += 2 + length
    return texts


def exif_texts(tiff: bytes) -> list[bytes]:
    """ASCII (and Windows XP UTF-16) values of the descriptive tags in IFD0 and the Exif IFD."""
    texts: list[bytes] = []
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return texts
    try:
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        visited: set[int] = set()
        todo = [ifd]
        while todo and len(visited) < 4:
            offset = todo.pop()
            if offset in visited or offset + 2 > len(tiff):
                continue
            visited.add(offset)
            (count,) = struct.unpack(order + "H", tiff[offset : offset + 2])
            for i in range(min(count, 128)):
                entry = tiff[offset + 2 + 12 * i : offset + 14 + 12 * i]
                if len(entry) < 12:
                    break
                tag, kind, n, value = struct.unpack(order + "HHI4s", entry)
                if tag == 0x8769:  # the Exif sub-IFD
                    todo.append(struct.unpack(order + "I", value)[0])
                    continue
                if tag not in _EXIF_ASCII_TAGS or kind not in (1, 2, 7) or n == 0:
                    continue
                n = min(n, 2000)
                raw = value[:n] if n <= 4 else tiff[struct.unpack(order + "I", value)[0] :][:n]
                if tag >= 0x9C9B:  # XP* tags are UTF-16LE
                    raw = raw.decode("utf-16-le", "replace").encode("utf-8", "replace")
                elif tag == 0x9286 and raw[:8] in (b"ASCII\x00\x00\x00", b"UNICODE\x00"):  # UserComment
                    raw = raw[8:].decode("utf-16" if raw[:1] == b"U" else "ascii", "replace").encode()
                texts.append(raw.rstrip(b"\x00"))
    except struct.error:
        pass
    return texts


def png_texts(data: bytes) -> list[bytes]:
    """Keyword and text of a PNG's tEXt, zTXt (keyword only) and iTXt chunks."""
    texts: list[bytes] = []
    pos = 8
    for _ in range(64):
        if pos + 8 > len(data):
            break
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + min(length, 4000)]
        if kind in (b"tEXt", b"iTXt"):
            texts.append(chunk.replace(b"\x00", b" "))
        elif kind == b"zTXt":
            texts.append(chunk.split(b"\x00", 1)[0])
        elif kind == b"IEND":
            break
        pos += 12 + length
    return texts
