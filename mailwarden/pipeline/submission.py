"""Rules for authenticated submission (RFC 6409).

A user may send only as addresses they own: their account and the aliases
that deliver to it, in MAIL FROM and in the header From. The message must
have exactly one From header with exactly one address (RFC 5322 §3.6 allows
more, but mail with several authors is a spoofing vector, and DMARC cannot
evaluate it).
"""

from __future__ import annotations

import re
import secrets
import time

from mailwarden.checks.from_header import FromHeaderError, parse_author
from mailwarden.protocol.smtp_reply import SmtpReply

_HEADER_LIMIT = 256 * 1024


def split_header_block(message: bytes) -> tuple[bytes, bytes]:
    """(header block including the blank line, body). No blank line: all header."""
    end = message.find(b"\r\n\r\n", 0, _HEADER_LIMIT)
    if end < 0:
        if message.startswith(b"\r\n"):
            return b"\r\n", message[2:]
        return message, b""
    return message[: end + 4], message[end + 4 :]


def check_sender(mail_from: str, owned: set[str]) -> None:
    if mail_from.lower() not in owned:
        raise SmtpReply(553, "5.7.1", "Sender address not owned by the authenticated user")


def check_from_header(header_block: bytes, owned: set[str]) -> None:
    """Exactly one From, with one address, owned by the user (the parser DMARC uses, so the
    same spoofing tricks are refused here as on inbound mail)."""
    try:
        author = parse_author(header_block)
    except FromHeaderError as exc:
        raise SmtpReply(550, "5.7.1", f"From header refused: {exc.reason}") from None
    if author.address.lower() not in owned:
        raise SmtpReply(550, "5.7.1", "From header address not owned by the authenticated user")


_MSGID_RE = re.compile(rb"^message-id\s*:", re.IGNORECASE | re.MULTILINE)


def ensure_message_id(header_block: bytes, hostname: str) -> bytes:
    """A Message-ID header line to prepend, or b'' if the message has one."""
    if _MSGID_RE.search(header_block):
        return b""
    ident = f"{int(time.time())}.{secrets.token_hex(8)}@{hostname}"
    return f"Message-ID: <{ident}>\r\n".encode()
