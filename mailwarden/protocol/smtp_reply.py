"""SMTP replies: one typed exception, and the one place replies are rendered.

Checks and storage raise `SmtpReply`; the endpoint renders it. Every reply
leaving the server passes through `render_reply`, which adds an RFC 3463
enhanced status code where the text has none and strips anything a client
could have smuggled in (CR, LF, control characters).
"""

from __future__ import annotations

import re

# Default enhanced codes for replies written without one (RFC 3463, RFC 5248).
_DEFAULT_ENHANCED = {
    "211": "2.0.0",
    "214": "2.0.0",
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.0.0",
    "421": "4.7.0",
    "432": "4.7.12",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "534": "5.7.9",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.0.0",
    "551": "5.1.6",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
# Replies that carry no enhanced code: the greeting, EHLO lines, AUTH challenges, DATA go-ahead.
_NO_ENHANCED = {"220", "334", "354"}
_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class SmtpReply(Exception):
    """A reply to send to the client; raised deep, rendered at the edge."""

    def __init__(self, code: int, enhanced: str, text: str, *, close: bool = False) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.close = close  # close the connection after sending

    def line(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def clean_text(text: str, limit: int = 200) -> str:
    """Make client-supplied text safe to echo in a reply or a log line."""
    text = _UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "..."


def render_reply(status: str, *, ehlo: bool = False) -> str:
    """Add the enhanced code a reply lacks and remove control characters."""
    status = _UNSAFE.sub("?", status)
    code, sep, rest = status[:3], status[3:4], status[4:]
    if ehlo or code in _NO_ENHANCED or sep == "-" or not code.isdigit():
        return status
    if _ENHANCED_RE.match(rest) and rest[0] == code[0]:
        return status
    if _ENHANCED_RE.match(rest):
        rest = rest.split(" ", 1)[1] if " " in rest else ""  # an enhanced code of the wrong class
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    return f"{code} {enhanced} {rest}".rstrip()
