"""Mailbox names in modified UTF-7 (RFC 3501 §5.1.3).

Printable US-ASCII except "&" stands for itself; "&" is "&-"; any other run of
characters is "&" + modified BASE64 (RFC 2045 alphabet with "," for "/", no
padding) of their UTF-16BE + "-". The decoder is strict: it refuses every form
the encoder would not produce (so one name has one spelling), and inputs longer
than `MAX_NAME` octets.
"""

from __future__ import annotations

import base64
import binascii

MAX_NAME = 1024  # octets of an encoded mailbox name


class MailboxNameError(ValueError):
    pass


def _printable(ch: str) -> bool:
    return 0x20 <= ord(ch) <= 0x7E


def encode_mailbox_name(name: str) -> bytes:
    out = bytearray()
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be", "surrogatepass")
            out.extend(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            run.clear()

    for ch in name:
        if _printable(ch):
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            run.append(ch)
    flush()
    if len(out) > MAX_NAME:
        raise MailboxNameError("mailbox name too long")
    return bytes(out)


def decode_mailbox_name(raw: bytes) -> str:
    if len(raw) > MAX_NAME:
        raise MailboxNameError("mailbox name too long")
    out: list[str] = []
    i = 0
    n = len(raw)
    last_was_encoded = False
    while i < n:
        c = raw[i]
        if c == 0x26:  # "&"
            end = raw.find(b"-", i + 1)
            if end < 0:
                raise MailboxNameError("unterminated &-sequence")
            chunk = raw[i + 1 : end]
            i = end + 1
            if not chunk:
                out.append("&")
                last_was_encoded = False
                continue
            if last_was_encoded:
                raise MailboxNameError("adjacent encoded sequences")
            if any(ch not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+," for ch in chunk):
                raise MailboxNameError("invalid modified BASE64")
            b64 = chunk.replace(b",", b"/")
            try:
                data = base64.b64decode(b64 + b"=" * (-len(b64) % 4), validate=True)
            except binascii.Error:
                raise MailboxNameError("invalid modified BASE64") from None
            if len(data) % 2 or base64.b64encode(data).rstrip(b"=") != b64:
                raise MailboxNameError("invalid modified BASE64 length or padding bits")
            try:
                text = data.decode("utf-16-be")
            except UnicodeDecodeError:
                raise MailboxNameError("invalid UTF-16 in mailbox name") from None
            if any(_printable(ch) for ch in text):
                raise MailboxNameError("printable ASCII must not be encoded")
            out.append(text)
            last_was_encoded = True
        elif 0x20 <= c <= 0x7E:
            out.append(chr(c))
            i += 1
            last_was_encoded = False
        else:
            raise MailboxNameError("8-bit or control octet in mailbox name")
    return "".join(out)
