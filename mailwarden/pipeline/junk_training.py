"""Which IMAP copies and moves are training events for the spam classifier.

Into Junk from anywhere else: the user says "spam". Out of Junk into any
mailbox but Trash: "ham" (deleting spam from Junk says nothing about it).
Mailboxes are recognised by their special-use attribute (\\Junk, \\Trash),
so a renamed Junk folder still counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailwarden.logs import log_event
from mailwarden.storage.interfaces import MailboxInfo, SpamTraining

JUNK = "\\Junk"
TRASH = "\\Trash"


def junk_label(source_use: str | None, dest_use: str | None) -> str | None:
    """The label a transfer between mailboxes with these special-use attributes teaches, or None."""
    if dest_use == JUNK and source_use != JUNK:
        return "spam"
    if source_use == JUNK and dest_use not in (JUNK, TRASH):
        return "ham"
    return None


async def record_transfer(
    store: SpamTraining, user: str, source: MailboxInfo, dest: MailboxInfo, dest_uids: Sequence[int], move: bool
) -> int:
    """Record the training events of an IMAP COPY/MOVE (read from the destination, where the copies now are)."""
    label = junk_label(source.special_use, dest.special_use)
    if label is None or not dest_uids:
        return 0
    kind = "imap_move" if move else "imap_copy"
    count = await store.add_training_from_mailbox(user, dest.name, list(dest_uids), label, kind)
    log_event("spam_training_recorded", user=user, label=label, source=kind, count=count)
    return count
