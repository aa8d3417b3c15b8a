"""Storage quotas at SMTP: refuse early at RCPT, recheck with the real size at the end of DATA.

RCPT: a recipient every one of whose accounts is at or over its quota, or
has no room for the size the client declared (MAIL FROM ... SIZE=, RFC 1870),
gets `452 4.2.2 Mailbox full` (a temporary failure: the sender retries, and the
owner may make room meanwhile; Postfix with Dovecot's quota-status does the same).
An alias that also reaches other accounts or outside addresses is accepted:
the others must not wait for one full mailbox.

End of DATA, with the size as it would be stored:
- every recipient of the message is a local account without room: 452 4.2.2,
  nothing is kept;
- only some: the message is accepted for the others, and the sender gets a
  DSN (5.2.2, RFC 3464) for the full ones, spooled right after the message,
  so nothing is dropped silently;
- only some, but no DSN can be sent (null sender <>, as for bounces, or a
  sender that resolves nowhere): the full mailboxes get the message anyway,
  over their quota (`event=quota_overrun`), since refusing would lose it for
  them while the others took it.

Usage is what is filed: messages accepted and not yet filed (milliseconds,
normally) are not counted, so concurrent deliveries can overrun a quota by
at most the messages in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mailwarden.logs import log_event
from mailwarden.outbound.bounces import DsnRecipient, DsnReport, build_dsn
from mailwarden.protocol.smtp_reply import SmtpReply, clean_text
from mailwarden.storage.interfaces import Resolution, StorageError
from mailwarden.storage.quota import QuotaState

FULL_TEXT = "over its storage quota"


def declared_size(mail_options: list[str]) -> int:
    """The SIZE= a client declared at MAIL (aiosmtpd checked it is digits); 0 if none."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit() and len(value) <= 19:
            return int(value)
    return 0


def _log_full(sid: str, stage: str, state: QuotaState, size: int, limit: int, **extra: Any) -> None:
    log_event("quota_full", sid=sid, stage=stage, user=state.address, size=size, used=state.used, limit=limit, **extra)


async def rcpt_check(accounts: Any, address: str, res: Resolution, declared: int, default: int, sid: str) -> None:
    """Raise SmtpReply 452 4.2.2 when every account `address` reaches has no room; else return."""
    if not res.local or res.remote:
        return
    states = await accounts.quota_states(res.local)
    full = [s for s in states.values() if s.would_exceed(declared, default)]
    if len(full) < len(res.local):
        return
    for state in full:
        _log_full(sid, "rcpt", state, declared, state.limit(default))
    who = f"<{clean_text(address, 320)}>"
    if declared and not any(s.used >= s.limit(default) for s in full):
        raise SmtpReply(452, "4.2.2", f"Mailbox full: {who} has no room for a message of {declared} bytes")
    raise SmtpReply(452, "4.2.2", f"Mailbox full: {who} is {FULL_TEXT}")


@dataclass
class DataDecision:
    """Where the message goes after the end-of-DATA quota check."""

    local: dict[str, str]  # account -> the envelope recipient it was reached by
    bounced: list[str] = field(default_factory=list)  # envelope recipients that get a DSN instead
    dsn_route: Resolution | None = None


async def data_check(
    accounts: Any,
    local: dict[str, str],
    remote: list[str],
    sender: str,
    size: int,
    default: int,
    delimiter: str,
    sid: str,
) -> DataDecision:
    """Recheck every local account with the stored size; raise SmtpReply 452 4.2.2 if no recipient has room."""
    if not local:
        return DataDecision(local)
    states = await accounts.quota_states(list(local))
    full = {a: s for a, s in states.items() if a in local and s.would_exceed(size, default)}
    if not full:
        return DataDecision(local)
    if len(full) == len(local) and not remote:
        for state in full.values():
            _log_full(sid, "data", state, size, state.limit(default))
        rcpts = ", ".join(f"<{clean_text(local[a], 320)}>" for a in sorted(full))
        raise SmtpReply(452, "4.2.2", f"Mailbox full: {clean_text(rcpts, 400)} {FULL_TEXT}")
    route = await _dsn_route(accounts, sender, delimiter)
    if route is None:
        for state in full.values():
            log_event(
                "quota_overrun", sid=sid, user=state.address, size=size, used=state.used,
                limit=state.limit(default), reason="no_dsn_possible",
            )  # fmt: skip
        return DataDecision(local)
    for state in full.values():
        _log_full(sid, "data", state, size, state.limit(default), action="dsn")
    kept = {a: r for a, r in local.items() if a not in full}
    return DataDecision(kept, sorted({local[a] for a in full}), route)


async def _dsn_route(accounts: Any, sender: str, delimiter: str) -> Resolution | None:
    """Where a DSN to `sender` would go; None when nowhere (null sender, or no such address here)."""
    if not sender:
        return None
    try:
        res: Resolution = await accounts.resolve(sender, delimiter)
    except StorageError:
        return None
    return res if res.local or res.remote else None


def dsn_message(
    decision: DataDecision, queue_id: str, sender: str, original: bytes, hostname: str, domain: str
) -> tuple[dict[str, Any], bytes]:
    """The DSN (5.2.2 for each bounced recipient) and its spool envelope, from <> like every DSN."""
    now = time.time()
    report = DsnReport(
        action="failed",
        queue_id=queue_id,
        sender=sender,
        arrival=now,
        recipients=[
            DsnRecipient(r, "5.2.2", None, f"Mailbox full: {FULL_TEXT}", last_attempt=now) for r in decision.bounced
        ],
    )
    dsn = build_dsn(report, original, reporting_mta=hostname, postmaster_domain=domain, now=now)
    route = decision.dsn_route
    assert route is not None
    envelope: dict[str, Any] = {
        "sender": "",
        "local": [[sender, account, "INBOX"] for account in route.local],
        "remote": list(route.remote),
        "ip": "127.0.0.1",
        "user": None,
        "listener": "internal",
        "time": now,
    }
    return envelope, dsn
