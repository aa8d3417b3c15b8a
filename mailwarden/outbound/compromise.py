"""Compromised-account detection: hold an account's outbound mail when it starts sending like a spammer.

A stolen password shows up in three ways, each a signal here:

* **a burst of unique outside recipients**: more than `hold.unique_recipients_per_hour`
  distinct addresses outside our domains in the last hour (people write to the
  same few correspondents; spam runs write to thousands);
* **a high bounce rate**: at least `hold.min_bounce_sample` delivery attempts in the
  last hour of which more than `hold.bounce_rate` failed permanently (spam lists
  are full of dead addresses);
* **sending right after a login from a new IP**: a login from an address this
  account has not used in `hold.known_ip_days`, followed within the hour by mail
  to more than `hold.new_ip_recipients` unique outside recipients.

Past a threshold the account is put on hold: its outbound mail is queued
with status "held" (never sent until released), the administrator gets a log
line, a metric and a mail, and `mailwarden user unhold U` (or `queue release ID`
per message) undoes it. Every decision is logged with the numbers behind it.
Mail to our own domains is never held: it does not leave the server.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mailwarden.storage.interfaces import Activity

HOUR = 3600


@dataclass(frozen=True)
class HoldPolicy:
    unique_recipients_per_hour: int = 200  # 0 = signal off
    bounce_rate: float = 0.3
    min_bounce_sample: int = 20  # 0 = signal off
    new_ip_recipients: int = 30  # 0 = signal off
    known_ip_days: int = 30

    @classmethod
    def from_config(cls, cfg: Any) -> HoldPolicy:
        return cls(
            cfg.get("hold.unique_recipients_per_hour"),
            cfg.get("hold.bounce_rate"),
            cfg.get("hold.min_bounce_sample"),
            cfg.get("hold.new_ip_recipients"),
            cfg.get("hold.known_ip_days"),
        )


@dataclass(frozen=True)
class HoldDecision:
    signal: str  # recipient_burst, bounce_rate, new_ip_burst
    reason: str  # the numbers, for the log, the alert and `user show`


class ActivityStore(Protocol):
    async def note_recipients(self, user: str, hashes: Sequence[str], now: float) -> None: ...
    async def note_login(self, user: str, ip: str, now: float, known_days: int) -> bool: ...
    async def activity(self, user: str, now: float) -> Activity: ...
    async def hold_account(self, user: str, reason: str, now: float) -> bool: ...
    async def account_hold(self, user: str) -> str | None: ...


def recipient_hash(address: str) -> str:
    """Recipients are kept as hashes: the count needs identity, not the addresses."""
    return hashlib.sha256(address.strip().lower().encode("utf-8", "replace")).hexdigest()[:32]


def decide(activity: Activity, policy: HoldPolicy) -> HoldDecision | None:
    """The first signal past its threshold, or None."""
    if policy.unique_recipients_per_hour and activity.unique_outside_recipients > policy.unique_recipients_per_hour:
        return HoldDecision(
            "recipient_burst",
            f"{activity.unique_outside_recipients} unique outside recipients in the last hour "
            f"(threshold {policy.unique_recipients_per_hour})",
        )
    if policy.min_bounce_sample and activity.attempts >= policy.min_bounce_sample:
        rate = activity.failures / activity.attempts
        if rate > policy.bounce_rate:
            return HoldDecision(
                "bounce_rate",
                f"{activity.failures} of {activity.attempts} deliveries failed in the last hour "
                f"({rate:.0%}, threshold {policy.bounce_rate:.0%})",
            )
    if (
        policy.new_ip_recipients
        and activity.new_ip_login
        and activity.recipients_since_new_ip > policy.new_ip_recipients
    ):
        return HoldDecision(
            "new_ip_burst",
            f"login from a new address {activity.new_ip_login}, then {activity.recipients_since_new_ip} unique "
            f"outside recipients (threshold {policy.new_ip_recipients})",
        )
    return None


class CompromiseGuard:
    """Called by submission: records logins and recipients, and says whether to hold."""

    def __init__(self, policy: HoldPolicy, store: ActivityStore) -> None:
        self.policy = policy
        self.store = store

    async def login(self, user: str, ip: str, now: float | None = None) -> bool:
        """Record a login; True when the IP is new for this account."""
        return await self.store.note_login(user, ip, time.time() if now is None else now, self.policy.known_ip_days)

    async def held(self, user: str) -> str | None:
        """The hold reason if the account is on hold."""
        return await self.store.account_hold(user)

    async def after_accept(
        self, user: str, outside_recipients: Sequence[str], now: float | None = None
    ) -> HoldDecision | None:
        """Count this message's outside recipients; a decision when the account must now be held.

        The message that crosses the threshold is itself held (the caller
        queues it as held), so nothing past the threshold leaves.
        """
        now = time.time() if now is None else now
        if outside_recipients:
            await self.store.note_recipients(user, [recipient_hash(r) for r in outside_recipients], now)
        decision = decide(await self.store.activity(user, now), self.policy)
        if decision is not None and not await self.store.hold_account(user, decision.reason, now):
            return None  # already on hold: one alert per hold
        return decision


def hold_alert(user: str, decision: HoldDecision, postmaster: str, hostname: str, account: bool = True) -> bytes:
    """The mail postmaster gets when an account, or one message (`account=False`), is put on hold."""
    import email.utils

    what = f"Outbound mail from {user} is on hold" if account else f"A message from {user} is held"
    body = (
        f"{what}: {decision.reason}.\r\n\r\n"
        "Held mail stays in the queue and is not sent. If the account is fine, release it:\r\n"
        f"  mailwarden user unhold {user}\r\n"
        "If it is not, change its password (mailwarden user passwd) and delete the held mail\r\n"
        "(mailwarden queue list; mailwarden queue delete ID).\r\n"
    )
    headers = {
        "From": f"Mailwarden <MAILER-DAEMON@{hostname}>",
        "To": postmaster,
        "Subject": f"{'Account on hold' if account else 'Message held'}: {user} ({decision.signal})",
        "Date": email.utils.formatdate(localtime=False),
        "Message-ID": email.utils.make_msgid("hold", domain=hostname),
        "Auto-Submitted": "auto-generated",
        "Content-Type": "text/plain; charset=utf-8",
    }
    return ("".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n" + body).encode("utf-8")
