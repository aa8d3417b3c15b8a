"""Mail the server writes itself (alerts to postmaster), delivered like accepted mail.

It goes through the same spool and filer as mail received over SMTP, so it
is durable before anyone is told it was sent, and it reaches whatever the
address resolves to (postmaster is usually an alias to a person).
"""

from __future__ import annotations

import time
from typing import Any

from mailwarden.logs import log_event
from mailwarden.storage.spool import SpoolRecord, new_queue_id


async def deliver_local(services: Any, recipient: str, message: bytes, reason: str) -> bool:
    """File `message` for a hosted `recipient`; False (and a log line) when it resolves to no mailbox."""
    resolution = await services.accounts.resolve(recipient, services.config.get("smtp.recipient_delimiter"))
    accounts = list(resolution.local)
    if not accounts:
        log_event("local_mail_undeliverable", rcpt=recipient, reason=reason)
        return False
    qid = new_queue_id()
    envelope = {
        "sender": "",
        "local": [[recipient, account, "INBOX"] for account in accounts],
        "remote": [],
        "ip": "127.0.0.1",
        "user": None,
        "listener": "internal",
        "time": time.time(),
    }
    await services.spool.append(qid, envelope, message)
    services.filer.submit(SpoolRecord(qid, envelope, message))
    log_event("local_mail", qid=qid, rcpt=recipient, reason=reason)
    return True
