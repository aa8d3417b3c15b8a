"""Authentication-Results (RFC 8601): the one header we write, and the forgeries we remove.

A downstream filter or mail client trusts an Authentication-Results header
whose authserv-id names us. So before adding ours we delete every incoming
one that claims our authserv-id (RFC 8601 §5), and the checks' resinfo
strings are the only text that goes into ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mailwarden.checks.result import CheckResult

_FIELD_NAME = re.compile(rb"^authentication-results\s*:", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def strip_claimed_auth_results(message: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Remove Authentication-Results fields whose authserv-id is ours; returns (message, removed)."""
    end = message.find(b"\r\n\r\n")
    head, rest = (message, b"") if end < 0 else (message[: end + 2], message[end + 2 :])
    lines = head.split(b"\r\n")
    kept: list[bytes] = []
    removed = 0
    skipping = False
    ours = authserv_id.lower().encode()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            i += 1
            continue
        skipping = False
        if _FIELD_NAME.match(line):
            # Unfold the whole field to read its authserv-id.
            field = [line]
            j = i + 1
            while j < len(lines) and lines[j][:1] in (b" ", b"\t"):
                field.append(lines[j])
                j += 1
            value = b" ".join(part.strip() for part in field).split(b":", 1)[1]
            if _authserv_id(value) == ours:
                removed += 1
                skipping = True
                i += 1
                continue
        kept.append(line)
        i += 1
    return b"\r\n".join(kept) + rest, removed


def _authserv_id(value: bytes) -> bytes:
    """The first token of the field, comments (RFC 8601 §2.2 CFWS) removed."""
    text = re.sub(rb"\([^)]*\)", b" ", value).strip()
    token = re.split(rb"[\s;]", text, maxsplit=1)[0]
    return token.lower()


def render_auth_results(authserv_id: str, results: Iterable[CheckResult]) -> bytes:
    """One Authentication-Results field (with CRLF) holding every check's resinfo."""
    entries = [_CONTROL.sub("", e) for r in results for e in r.auth_results if e]
    if not entries:
        entries = ["none"]
    body = ";\r\n\t".join([authserv_id, *entries])
    return f"Authentication-Results: {body}\r\n".encode("utf-8", "replace")
