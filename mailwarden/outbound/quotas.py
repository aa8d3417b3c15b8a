"""Sending quotas: messages and recipients per user and per domain, per hour and per day.

A stolen password is usually found by the volume it sends. Quotas bound the
damage and tell the administrator: past a quota the sender gets 451 4.7.1 (a
temporary refusal, so a legitimate client retries later and nothing is lost),
and the administrator gets a log line, a metric, and one mail to postmaster
per subject and window.

Counting is by fixed windows (the current clock hour, the current UTC day),
kept in the database so every worker and every node sees the same counts.
Messages are checked at MAIL (would one more exceed?), recipients at each RCPT,
and both are counted when a message is accepted. Users or domains in
`quotas.exempt` (a newsletter account, say) are neither checked nor counted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mailwarden.protocol.smtp_reply import SmtpReply
from mailwarden.storage.interfaces import Usage

WINDOWS = {"hour": 3600, "day": 86400}


@dataclass(frozen=True)
class QuotaLimit:
    scope: str  # "user" or "domain"
    window: str  # "hour" or "day"
    unit: str  # "messages" or "recipients"
    limit: int  # 0 = no limit


@dataclass(frozen=True)
class QuotaExceeded:
    subject: str  # the user address or the domain
    limit: QuotaLimit
    used: int
    window_start: int

    def reply(self) -> SmtpReply:
        who = "your account" if self.limit.scope == "user" else f"the domain {self.subject}"
        return SmtpReply(
            451,
            "4.7.1",
            f"Sending quota reached: {who} may send {self.limit.limit} {self.limit.unit} per {self.limit.window}; "
            "try again later",
        )


class CounterStore(Protocol):
    async def send_usage(
        self, subjects: Sequence[str], windows: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, str, int], Usage]: ...
    async def count_sent(
        self, subjects: Sequence[str], windows: Sequence[tuple[str, int]], recipients: int
    ) -> None: ...
    async def mark_quota_alerted(self, subject: str, window: str, start: int) -> bool: ...


class Quotas:
    def __init__(self, limits: Sequence[QuotaLimit], exempt: Sequence[str], store: CounterStore) -> None:
        self.limits = [q for q in limits if q.limit > 0]
        self.exempt = {e.lower() for e in exempt}
        self.store = store

    @classmethod
    def from_config(cls, cfg: Any, store: CounterStore) -> Quotas:
        limits = [
            QuotaLimit(scope, window, unit, cfg.get(f"quotas.{scope}_{unit}_per_{window}"))
            for scope in ("user", "domain")
            for window in WINDOWS
            for unit in ("messages", "recipients")
        ]
        return cls(limits, cfg.get("quotas.exempt"), store)

    def subjects(self, user: str) -> dict[str, str]:
        """scope -> subject for an authenticated user; exempt ones are left out."""
        user = user.lower()
        domain = user.rpartition("@")[2]
        if user in self.exempt or domain in self.exempt:
            return {}
        return {"user": user, "domain": domain}

    async def check(self, user: str, messages: int, recipients: int, now: float | None = None) -> QuotaExceeded | None:
        """Would `messages` more messages with `recipients` more recipients exceed a quota?"""
        subjects = self.subjects(user)
        if not subjects or not self.limits:
            return None
        windows = _windows(time.time() if now is None else now)
        usage = await self.store.send_usage(list(subjects.values()), windows)
        for quota in self.limits:
            subject = subjects[quota.scope]
            start = dict(windows)[quota.window]
            used = usage.get((subject, quota.window, start), Usage())
            current, adding = (used.messages, messages) if quota.unit == "messages" else (used.recipients, recipients)
            if adding and current + adding > quota.limit:
                return QuotaExceeded(subject, quota, current, start)
        return None

    async def count(self, user: str, recipients: int, now: float | None = None) -> None:
        subjects = self.subjects(user)
        if subjects and self.limits:
            await self.store.count_sent(
                list(subjects.values()), _windows(time.time() if now is None else now), recipients
            )

    async def first_alert(self, exceeded: QuotaExceeded) -> bool:
        """True once per subject and window: the caller then mails postmaster."""
        return await self.store.mark_quota_alerted(exceeded.subject, exceeded.limit.window, exceeded.window_start)


def _windows(now: float) -> list[tuple[str, int]]:
    return [(name, int(now) // seconds * seconds) for name, seconds in WINDOWS.items()]


def alert_message(exceeded: QuotaExceeded, postmaster: str, hostname: str, now: float | None = None) -> bytes:
    """The mail postmaster gets, once per subject and window."""
    import email.utils

    q = exceeded.limit
    subject = f"Sending quota reached: {exceeded.subject} ({q.limit} {q.unit} per {q.window})"
    body = (
        f"{exceeded.subject} has used {exceeded.used} of {q.limit} {q.unit} allowed per {q.window}.\r\n"
        "Further mail is refused with 451 4.7.1 until the window ends.\r\n\r\n"
        "If this is expected (a newsletter, a mailing), add the user or domain to quotas.exempt.\r\n"
        "If it is not, the account may be compromised: check its recent logins (event=auth_ok) and the queue.\r\n"
    )
    headers = {
        "From": f"Mailwarden <MAILER-DAEMON@{hostname}>",
        "To": postmaster,
        "Subject": subject,
        "Date": email.utils.formatdate(now, localtime=False),
        "Message-ID": email.utils.make_msgid("quota", domain=hostname),
        "Auto-Submitted": "auto-generated",
        "Content-Type": "text/plain; charset=utf-8",
    }
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n" + body).encode("utf-8")
