"""The one result type every inbound check returns.

A check never writes an SMTP reply and never touches a mailbox: it says what
it found (`result`, `reason`), what it suggests (`action`, `score`) and what
Authentication-Results should say. The pipeline alone decides what the
suggestions mean, and renders the SMTP reply, the Authentication-Results
header, the log line and `mailwarden inspect` from these same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Action(Enum):
    NONE = "none"  # nothing to do
    JUNK = "junk"  # deliver to the Junk folder
    QUARANTINE = "quarantine"  # hold for an administrator
    REJECT = "reject"  # 5xx
    TEMPFAIL = "tempfail"  # 4xx: try again later

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Action.NONE: 0, Action.JUNK: 1, Action.QUARANTINE: 2, Action.TEMPFAIL: 3, Action.REJECT: 4}


@dataclass(frozen=True)
class CheckResult:
    check: str  # "spf", "dkim", "dmarc", "arc", "dnsbl", ...
    result: str  # the check's own vocabulary, e.g. pass, fail, softfail, neutral, none, temperror, permerror, policy
    reason: str  # why, in words an administrator understands
    action: Action = Action.NONE
    score: float = 0.0
    auth_results: tuple[str, ...] = ()  # RFC 8601 resinfo, e.g. "spf=pass smtp.mailfrom=example.org"
    add_headers: tuple[tuple[str, str], ...] = ()
    details: dict[str, Any] = field(default_factory=dict)  # data for reports and `inspect`
    elapsed: float = 0.0  # seconds
    dns_lookups: int = 0
