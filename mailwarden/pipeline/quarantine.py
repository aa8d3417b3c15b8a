"""The quarantine: messages the verdict held, their release, deletion and the users' digest.

A message whose verdict is `quarantine` (an attachment rule under
`content.attachment_action = "quarantine"`, or any result the actions table
maps to quarantine) is accepted with 250 like any other, made durable in the
spool, and filed by the filer into the `quarantine` table instead of a
mailbox (pipeline/filing.py): nobody sees it until an administrator decides.

* `release` files it into each recipient's INBOX (and queues any forwarding
  targets) in the same transaction that marks it released, and trains it as
  ham for those users (the classifier learns from the administrator's call).
* `delete` drops the body; the row stays as the record of the decision.
* `digest` mails each user a summary of what was held for them since the
  last digest (`quarantine.digest = "daily"`: the server sends it at
  `quarantine.digest_hour` UTC; `mailwarden quarantine digest` sends it now).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from mailwarden.logs import log_event
from mailwarden.pipeline.headers import return_path
from mailwarden.storage.interfaces import DeliveryBatch, LocalDelivery, QuarantineEntry, RemoteDelivery

DIGEST_MAX_ITEMS = 200  # listed per user per digest; the rest is counted


def release_batch(entry: QuarantineEntry, body: bytes) -> DeliveryBatch:
    """What releasing files: the message in each recipient's INBOX, forwarding targets queued."""
    batch = DeliveryBatch()
    local_body = return_path(entry.sender) + body
    seen: set[str] = set()
    for rcpt, account in entry.local:
        if account in seen:
            continue
        seen.add(account)
        batch.local.append((LocalDelivery(entry.queue_id, rcpt, account, "INBOX"), local_body))
    for rcpt in entry.remote:
        batch.remote.append((RemoteDelivery(entry.queue_id, entry.sender, rcpt), body))
    return batch


class QuarantineError(Exception):
    """No such held message (the CLI prints it)."""


async def release(store: Any, entry_id: int) -> QuarantineEntry:
    """Deliver a held message to its recipients' INBOX and train it as ham; QuarantineError if not held."""
    entry = await store.get_quarantine(entry_id)
    if entry is None or entry.state != "held":
        raise QuarantineError(f"no held message {entry_id}")
    body = await store.read_blob(entry.blob)
    if not await store.release_quarantined(entry_id, release_batch(entry, body)):
        raise QuarantineError(f"no held message {entry_id}")
    for user in entry.users:  # a release says the filter was wrong: the spam classifier learns it as ham
        await store.add_training_event(user, "ham", "quarantine_release", body)
    log_event("quarantine_released", id=entry_id, qid=entry.queue_id, users=",".join(entry.users))
    return entry


async def delete(store: Any, entry_id: int) -> None:
    if not await store.delete_quarantined(entry_id):
        raise QuarantineError(f"no held message {entry_id}")
    log_event("quarantine_deleted", id=entry_id)


def digest_message(user: str, entries: list[QuarantineEntry], hostname: str, sender: str) -> bytes:
    """The summary mail for one user: what was held, from whom, why, and how to ask for a release."""
    now = datetime.now(UTC)
    lines = [
        f"{len(entries)} message{'s' if len(entries) != 1 else ''} addressed to you {'were' if len(entries) != 1 else 'was'}"
        " held in quarantine by the mail server and not delivered.",
        "If one of them is legitimate, ask your administrator to release it (quote its number).",
        "",
    ]
    for e in entries[:DIGEST_MAX_ITEMS]:
        when = datetime.fromtimestamp(e.created, UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines += [
            f"#{e.id}  {when}",
            f"  From:    {_clean(e.from_addr or e.sender or '<>')}",
            f"  Subject: {_clean(e.subject)}",
            f"  Reason:  {_clean(e.reason)[:300]}",
            "",
        ]
    if len(entries) > DIGEST_MAX_ITEMS:
        lines.append(f"... and {len(entries) - DIGEST_MAX_ITEMS} more.")
    body = "\r\n".join(lines) + "\r\n"
    headers = [
        f"From: Mail server <{sender}>",
        f"To: <{user}>",
        f"Subject: Quarantine digest: {len(entries)} held message{'s' if len(entries) != 1 else ''}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in str(text))[:200]


async def send_digests(
    store: Any, deliver: Callable[[str, bytes], Awaitable[bool]], hostname: str, sender: str
) -> dict[str, int]:
    """Mail each user with held messages not yet in a digest; {user: count}. Marked only once filed."""
    per_user: dict[str, list[QuarantineEntry]] = {}
    for e in await store.list_quarantine("held"):
        if not e.notified:
            for user in e.users:
                per_user.setdefault(user, []).append(e)
    sent: dict[str, int] = {}
    notified: set[int] = set()
    for user, entries in per_user.items():
        if await deliver(user, digest_message(user, entries, hostname, sender)):
            sent[user] = len(entries)
            notified.update(e.id for e in entries)
    if notified:
        await store.mark_quarantine_notified(sorted(notified))
    log_event("quarantine_digest", users=len(sent), messages=len(notified))
    return sent


@contextlib.asynccontextmanager
async def offline_mail(config: Any, spool_root: Path, store: Any) -> AsyncIterator[Any]:
    """The services `local_mail.deliver_local` needs, for a CLI command without a running server.

    Mail goes through a spool of its own (spool/w-cli-<pid>: the next start
    recovers it like a worker's, should this process die before filing), so
    it is as durable as mail a server writes.
    """
    from mailwarden.pipeline.filing import Filer
    from mailwarden.server import make_spool

    directory = spool_root / f"w-cli-{os.getpid()}"
    spool = make_spool(config, directory)
    spool.recover()  # a fresh directory: creates it, finds nothing
    filer = Filer(spool, store)
    filer.start()
    spool.start()

    class _Services:
        pass

    services = _Services()
    services.config = config  # type: ignore[attr-defined]
    services.accounts = store  # type: ignore[attr-defined]
    services.spool = spool  # type: ignore[attr-defined]
    services.filer = filer  # type: ignore[attr-defined]
    try:
        yield services
        await filer.drained()
    finally:
        await spool.stop()  # retires the filed segments
        await filer.stop()
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty: anything unfiled stays for the next start


async def digest_periodically(services: Any, store: Any, hostname: str, hour: int) -> None:
    """Send the digest once a day at `hour` UTC (worker 0 only, started by server.py)."""
    from mailwarden.pipeline.local_mail import deliver_local

    primary = services.config.get("server.primary_domain") or hostname
    sender = f"postmaster@{primary}"

    async def deliver(user: str, message: bytes) -> bool:
        return await deliver_local(services, user, message, "quarantine_digest")

    while True:
        now = time.time()
        today = datetime.fromtimestamp(now, UTC).replace(hour=hour, minute=0, second=0, microsecond=0)
        due = today.timestamp() if today.timestamp() > now else today.timestamp() + 86400
        await asyncio.sleep(due - now)
        try:
            await send_digests(store, deliver, hostname, sender)
        except Exception as exc:  # a failed digest must not end the loop; the next day retries
            log_event("quarantine_digest_failed", logging.ERROR, error=type(exc).__name__)
