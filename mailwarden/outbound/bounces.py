"""Delivery status notifications (RFC 3464): the bounce and the delay warning.

A DSN is a multipart/report; report-type=delivery-status with three parts:
a text a person can read (what failed, for which recipients, what the
remote server answered), a machine-readable message/delivery-status, and the
original message's header section as text/rfc822-headers (not its body,
which the sender has and which may be large).

The original message is untrusted input, so it is never handed to the
stdlib email parser (which raises IndexError and friends on some hostile
headers and is slow on huge ones): the header section is cut out by bytes,
bounded (`ORIGINAL_HEADERS_MAX`, lines cut at 998 bytes), stripped of NULs
and bare CR/LF; only the Subject and Message-ID are decoded, inside a
try. Every text taken from the remote server or the envelope is flattened
to one line without control characters and bounded, so a DSN can neither
break out of its own structure nor grow without limit.

A DSN has the null envelope sender <> (RFC 3464 §2; RFC 5321 §4.5.5), so a
failing DSN is never answered with another one; `route_dsn` is only called
for messages whose sender was not <>.
"""

from __future__ import annotations

import email.header
import email.utils
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from mailwarden.storage.interfaces import DeliveryBatch, LocalDelivery, RemoteDelivery, Resolution

ORIGINAL_HEADERS_MAX = 16 * 1024  # bytes of the original header section quoted
MAX_LISTED_RECIPIENTS = 200  # more are summarised in one line
_TEXT_MAX = 1000  # characters of one remote answer or reason
_LINE_MAX = 998  # RFC 5322 §2.1.1
_SCAN_MAX = 256 * 1024  # where the original's header section may end at most
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}>")  # printable ASCII without < > and whitespace


@dataclass(frozen=True)
class DsnRecipient:
    """One recipient's line in a DSN."""

    recipient: str
    status: str  # RFC 3463, e.g. "5.1.1", or "4.4.1" for one that is delayed or expired
    code: int | None  # the remote's reply code, None if it never answered
    text: str  # the remote's reply text, or why there was no reply
    remote: str = ""  # "host [ip]" of the server that answered
    last_attempt: float = 0.0


@dataclass(frozen=True)
class DsnReport:
    """What one DSN tells about one message."""

    action: Literal["failed", "delayed"]
    queue_id: str
    sender: str  # the original envelope sender, the DSN's recipient
    arrival: float
    recipients: Sequence[DsnRecipient]
    will_retry_until: float | None = None  # delayed: when we give up
    expired: bool = False  # failed because it stayed deferred past queue.max_lifetime


def one_line(value: object, limit: int = _TEXT_MAX) -> str:
    """Flatten to one line without control characters, at most `limit` characters."""
    return " ".join(_CONTROL.sub(" ", str(value)).split())[:limit]


def _wrap(line: str, width: int, indent: str) -> list[str]:
    """Lines of at most `width` characters (so at most 4 * width bytes, under RFC 5322's 998)."""
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _ascii(value: str) -> str:
    return value.encode("ascii", "backslashreplace").decode("ascii")


def _date(ts: float) -> str:
    try:
        return email.utils.format_datetime(datetime.fromtimestamp(ts, UTC))
    except (OverflowError, OSError, ValueError):
        return email.utils.format_datetime(datetime.now(UTC))


def original_headers(message: bytes) -> bytes:
    """The original's header section, CRLF-terminated lines, bounded in size and line length."""
    head = message[:_SCAN_MAX]
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end >= 0:
            head = head[:end]
            break
    lines = re.split(rb"\r\n|\r|\n", head.replace(b"\x00", b""))
    out: list[bytes] = []
    size = 0
    for line in lines:
        line = line[:_LINE_MAX]
        if not line.strip():
            continue  # an empty line inside would end the quoted header section early
        if size + len(line) + 2 > ORIGINAL_HEADERS_MAX:
            break
        out.append(line)
        size += len(line) + 2
    return b"".join(line + b"\r\n" for line in out)


def _header_value(headers: bytes, name: bytes) -> str:
    """One header's unfolded value from a bounded header section ("" if absent or undecodable)."""
    found: bytes | None = None
    for line in headers.split(b"\r\n"):
        if found is not None:
            if line[:1] in (b" ", b"\t"):
                found += b" " + line.strip()
                continue
            break
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            found = value.strip()
    if not found:
        return ""
    text = found.decode("utf-8", "replace")
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except Exception:  # hostile encoded-words: IndexError, LookupError, ValueError...
            pass
    return one_line(text, 300)


def _remote_host(remote: str) -> str:
    """The host name of "host [ip]" (or "host[ip]"), for Remote-MTA."""
    host = remote.split("[", 1)[0].strip()
    return one_line(host or remote, 255)


def _diagnostic(r: DsnRecipient) -> str:
    text = one_line(r.text)
    if r.code is not None:
        return f"smtp; {r.code} {text}" if not text.startswith(str(r.code)) else f"smtp; {text}"
    return f"X-Mailwarden; {text or 'no answer'}"


def _human_text(report: DsnReport, reporting_mta: str, subject: str, listed: Sequence[DsnRecipient]) -> str:
    lines = [f"This is the mail system at {reporting_mta}.", ""]
    if report.action == "delayed":
        until = _date(report.will_retry_until or report.arrival)
        lines += [
            "Your message has not been delivered yet to the recipients below.",
            f"The mail system will keep trying until {until}.",
            "You do not need to send it again; you will be told if it finally fails.",
        ]
    elif report.expired:
        lines += [
            "Your message could not be delivered to the recipients below.",
            "Their servers kept refusing it temporarily, or could not be reached, until",
            "the mail system gave up. This was the last answer for each:",
        ]
    else:
        lines += [
            "Your message could not be delivered to the recipients below.",
            "The receiving mail system refused it permanently. Its answer for each:",
        ]
    lines.append("")
    for r in listed:
        said = one_line(r.text) or "no answer"
        where = f"{_remote_host(r.remote)} said: " if r.remote else ""
        code = f"{r.code} " if r.code is not None and not said.startswith(str(r.code)) else ""
        lines.append(f"<{one_line(r.recipient, 320)}>: {where}{code}{said}")
    hidden = len(report.recipients) - len(listed)
    if hidden > 0:
        lines.append(f"... and {hidden} more recipients with the same outcome.")
    lines += [
        "",
        f"The message was queued as {one_line(report.queue_id, 64)} on {_date(report.arrival)}.",
    ]
    if subject:
        lines.append(f"Its subject was: {subject}")
    lines.append("Its header section is attached below.")
    return "\r\n".join(w for line in lines for w in _wrap(line, 76, "    ")) + "\r\n"


def _status_part(report: DsnReport, reporting_mta: str, listed: Sequence[DsnRecipient]) -> str:
    fields = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mailwarden-Queue-ID: {_ascii(one_line(report.queue_id, 64))}",
        f"Arrival-Date: {_date(report.arrival)}",
        "",
    ]
    for r in listed:
        fields.append(f"Final-Recipient: rfc822; {_ascii(one_line(r.recipient, 320))}")
        fields.append(f"Action: {report.action}")
        status = r.status if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", r.status) else "4.0.0"
        if report.action == "failed" and not report.expired and status[0] != "5":
            status = "5.0.0"  # a failure that was not an expiry is permanent
        fields.append(f"Status: {status}")
        if r.remote:
            fields.append(f"Remote-MTA: dns; {_ascii(_remote_host(r.remote))}")
        fields.append(f"Diagnostic-Code: {_ascii(_diagnostic(r))}")
        if r.last_attempt:
            fields.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if report.action == "delayed" and report.will_retry_until:
            fields.append(f"Will-Retry-Until: {_date(report.will_retry_until)}")
        fields.append("")
    # Long values (a remote's answer) are folded; unfolding gives them back.
    return "\r\n".join(w for f in fields for w in _wrap(f, 200, " "))


def _part(content_type: str, body: bytes) -> bytes:
    cte = "7bit" if body.isascii() else "8bit"
    return f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode() + body


def build_dsn(
    report: DsnReport,
    original: bytes,
    *,
    reporting_mta: str,
    postmaster_domain: str,
    now: float,
) -> bytes:
    """The whole DSN message, CRLF line endings. Never raises on a hostile `original` or reply text.

    Its size is bounded: the quoted headers by ORIGINAL_HEADERS_MAX, each
    recipient's entry by _TEXT_MAX, and at most MAX_LISTED_RECIPIENTS entries.
    """
    mta = one_line(reporting_mta, 253) or "localhost"
    headers = original_headers(original)
    subject = _header_value(headers, b"subject")
    message_id = _header_value(headers, b"message-id")
    listed = list(report.recipients[:MAX_LISTED_RECIPIENTS])
    text = _human_text(report, mta, subject, listed).encode("utf-8", "replace")
    status = _status_part(report, mta, listed).encode("ascii", "replace")
    parts = [
        _part("text/plain; charset=utf-8" if not text.isascii() else "text/plain; charset=us-ascii", text),
        _part("message/delivery-status", status),
        _part("text/rfc822-headers", headers),
    ]
    boundary = f"=_mailwarden_dsn_{secrets.token_hex(12)}"
    while any(boundary.encode() in p for p in parts):  # practically never: 96 random bits
        boundary = f"=_mailwarden_dsn_{secrets.token_hex(12)}"
    failed = report.action == "failed"
    domain = one_line(postmaster_domain, 253) or mta
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{domain}>",
        f"To: <{one_line(report.sender, 320)}>",
        "Subject: " + ("Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"),
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{mta}>",
    ]
    if _MESSAGE_ID.fullmatch(message_id):
        head += [f"In-Reply-To: {message_id}", f"References: {message_id}"]
    head += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
    ]
    out = ("\r\n".join(head) + "\r\n").encode("utf-8", "replace")
    for p in parts:
        out += f"\r\n--{boundary}\r\n".encode() + p
        if not p.endswith(b"\r\n"):
            out += b"\r\n"
    return out + f"\r\n--{boundary}--\r\n".encode()


def route_dsn(resolution: Resolution, dsn_queue_id: str, sender: str, dsn: bytes) -> DeliveryBatch | None:
    """Where a DSN to `sender` goes: the INBOX of the account(s) it resolves to here,
    and the queue (envelope sender <>) for addresses elsewhere. None: nowhere
    (a hosted domain with no such user)."""
    batch = DeliveryBatch()
    for account in resolution.local:
        batch.local.append((LocalDelivery(dsn_queue_id, sender, account, "INBOX"), b"Return-Path: <>\r\n" + dsn))
    for target in resolution.remote:
        batch.remote.append((RemoteDelivery(dsn_queue_id, "", target), dsn))
    return batch if batch.local or batch.remote else None
