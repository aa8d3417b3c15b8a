"""The RCPT stage: is this recipient ours, and may this session relay?

Postfix's `reject_unauth_destination` and `reject_unlisted_recipient`, in
that order: an unknown user in a hosted domain is refused at RCPT with
550 5.1.1 (never accepted and bounced later, which would make us a
backscatter source), and a non-hosted domain is refused with 554 5.7.1
unless the session authenticated.
"""

from __future__ import annotations

from mailwarden.protocol.smtp_reply import SmtpReply
from mailwarden.storage.interfaces import Accounts, Resolution, StorageError


async def check_recipient(accounts: Accounts, address: str, authenticated: bool, delimiter: str) -> Resolution:
    try:
        res = await accounts.resolve(address, delimiter)
    except StorageError:
        raise SmtpReply(501, "5.1.3", "Bad recipient address syntax") from None
    if res.kind == "unknown":
        raise SmtpReply(550, "5.1.1", "Recipient address rejected: user unknown")
    if res.kind == "relay" and not authenticated:
        raise SmtpReply(554, "5.7.1", "Relay access denied")
    return res
