"""Size and count limits: global, per domain and per user, each enforced at the earliest SMTP stage that knows it.

| limit | known at | reply |
| --- | --- | --- |
| messages per session | MAIL | 421 4.7.0, connection closed |
| message size | MAIL (SIZE=), then while DATA streams | 552 5.3.4 |
| recipients per message | RCPT | 452 4.5.3 |
| header section size | end of DATA (the header ends inside DATA) | 552 5.3.4 |
| attachment size, per part and in total | end of DATA (needs the MIME structure) | 552 5.3.4 |

The global values are the `smtp.*` and `limits.*` options. `limits.overrides`
maps a domain or an address to its own values; for an authenticated user the
user's entry wins over the domain's, which wins over the global value. The MX
listener (unauthenticated mail) uses the global values.

Attachment sizes are the *decoded* sizes, estimated from the encoded part
(base64 is 4/3 of the data, quoted-printable at most 3x): a limit is about what
the user attached, not about transfer encoding. The MIME walk is bounded like
the URI scanner's: one walk in checks/mime_walk.py, at most `MAX_PARTS` parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mailwarden.checks.mime_walk import shared_walk
from mailwarden.protocol.smtp_reply import SmtpReply

MAX_PARTS = 200


@dataclass(frozen=True)
class SendLimits:
    max_message_bytes: int
    max_header_bytes: int
    max_attachment_bytes: int  # per part, decoded; 0 = no separate limit
    max_attachments_total_bytes: int  # all attachments, decoded; 0 = no separate limit
    max_recipients: int
    max_messages_per_session: int


class LimitTable:
    """The global limits and the overrides; `for_sender` picks the values that apply."""

    def __init__(self, base: SendLimits, overrides: Mapping[str, Mapping[str, int]]) -> None:
        self.base = base
        self.overrides = {key.lower(): dict(values) for key, values in overrides.items()}

    @classmethod
    def from_config(cls, cfg: Any) -> LimitTable:
        base = SendLimits(
            max_message_bytes=cfg.get("smtp.max_message_size"),
            max_header_bytes=cfg.get("limits.max_header_bytes"),
            max_attachment_bytes=cfg.get("limits.max_attachment_bytes"),
            max_attachments_total_bytes=cfg.get("limits.max_attachments_total_bytes"),
            max_recipients=cfg.get("smtp.max_recipients"),
            max_messages_per_session=cfg.get("smtp.max_messages_per_session"),
        )
        return cls(base, cfg.get("limits.overrides"))

    def for_sender(self, user: str | None) -> SendLimits:
        """The limits for an authenticated user (None: an unauthenticated session)."""
        if not user:
            return self.base
        user = user.lower()
        limits = self.base
        for key in (user.rpartition("@")[2], user):  # the domain, then the user: the most specific wins
            values = self.overrides.get(key)
            if values:
                limits = replace(limits, **values)
        return limits


def check_declared_size(declared: int | None, limits: SendLimits) -> None:
    """MAIL FROM ... SIZE=n (RFC 1870): refuse at once what will be too big."""
    if declared is not None and declared > limits.max_message_bytes:
        raise SmtpReply(552, "5.3.4", f"Message size {declared} exceeds the limit of {limits.max_message_bytes} bytes")


def check_content(message: bytes, limits: SendLimits) -> None:
    """The end-of-DATA limits: header section size, then attachment sizes. Raises SmtpReply."""
    end = message.find(b"\r\n\r\n")
    header_bytes = len(message) if end < 0 else end + 4
    if header_bytes > limits.max_header_bytes:
        raise SmtpReply(
            552,
            "5.3.4",
            f"Message header section of {header_bytes} bytes exceeds the limit of {limits.max_header_bytes}",
        )
    if (
        not (limits.max_attachment_bytes or limits.max_attachments_total_bytes)
        or b"ontent-" not in message[:header_bytes]
    ):
        return  # no attachment limits, or no MIME headers at all: nothing is attached
    total = 0
    for name, size in attachment_sizes(message):
        if limits.max_attachment_bytes and size > limits.max_attachment_bytes:
            raise SmtpReply(
                552,
                "5.3.4",
                f"Attachment {name} of about {size} bytes exceeds the limit of {limits.max_attachment_bytes}",
            )
        total += size
        if limits.max_attachments_total_bytes and total > limits.max_attachments_total_bytes:
            raise SmtpReply(
                552,
                "5.3.4",
                f"Attachments total about {total} bytes, over the limit of {limits.max_attachments_total_bytes}",
            )


def attachment_sizes(message: bytes) -> list[tuple[str, int]]:
    """(display name, estimated decoded size) of each attachment-like part, from the one bounded MIME walk.

    An attachment is a leaf part with a filename or Content-Disposition
    attachment, or any non-text leaf part (checks/mime_walk.py). A part the
    parser cannot read is counted at the whole message's size, so malformed
    MIME cannot hide a large payload.
    """
    found: list[tuple[str, int]] = []
    mime = shared_walk(message, max_parts=MAX_PARTS)
    if mime.too_deep:  # parts nested past the walk's depth are not seen: count them as the whole message
        found.append(("(MIME nested too deep)", len(message)))
    for part in mime.attachments():
        if part.unreadable:
            found.append(("(unreadable MIME)" if part.index == 0 else "(unreadable part)", len(message)))
        else:
            found.append((_printable(part.filename or part.content_type), part.decoded_size_estimate))
    return found


def _printable(name: str) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in str(name))[:80]
    return f'"{cleaned}"'
