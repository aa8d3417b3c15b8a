"""The storage contracts the rest of the server codes against.

Endpoints and the pipeline receive these Protocols and never import a
backend, so the SQLite/files implementation can be swapped for PostgreSQL
(and encryption at rest can wrap `Blobs`) without touching protocol code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mailwarden.storage.quota import QuotaState

SPECIAL_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Junk", "\\Junk"),
    ("Trash", "\\Trash"),
    ("Archive", "\\Archive"),
)


class StorageError(Exception):
    """A request the store refuses (unknown domain, duplicate user, ...)."""


@dataclass(frozen=True)
class Activity:
    """One account's last hour, for compromised-account detection (outbound/compromise.py)."""

    unique_outside_recipients: int
    attempts: int  # delivery attempts that ended (delivered or failed) in the last hour
    failures: int  # of those, permanent failures
    new_ip_login: str | None  # the new IP a login came from within the last hour, if any
    recipients_since_new_ip: int


@dataclass(frozen=True)
class Usage:
    """What one user or domain sent in one quota window (outbound/quotas.py)."""

    messages: int = 0
    recipients: int = 0


@dataclass(frozen=True)
class AppPasswordInfo:
    """An app password as listed: never its hash."""

    name: str
    created: float
    last_used: float | None


@dataclass(frozen=True)
class SigningKey:
    """One domain key: DKIM signatures and ARC seals (outbound/dkim_keys.py makes them)."""

    domain: str
    selector: str
    algorithm: str  # rsa-sha256 or ed25519-sha256
    private_pem: str
    public_txt: str  # the TXT record value for <selector>._domainkey.<domain>
    created: float
    state: str = "active"  # active, retiring, retired
    retire_at: float | None = None  # a retiring key: when the rotation overlap ends and it becomes retired


@dataclass(frozen=True)
class Account:
    id: int
    address: str
    password_hash: str


@dataclass(frozen=True)
class MailboxInfo:
    id: int
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int
    messages: int


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    size: int
    internal_date: float
    flags: tuple[str, ...]
    from_: str
    subject: str
    date: str
    blob: str
    queue_id: str


@dataclass(frozen=True)
class QueueEntry:
    queue_id: str
    sender: str
    recipient: str
    status: str
    attempts: int
    created: float
    next_attempt: float
    last_error: str
    size: int
    blob: str
    id: int = 0  # the row, for the queue runner's claims and outcomes
    lease_until: float = 0.0  # while "sending": when the claim lapses
    warned: bool = False  # a delay warning went to the sender

    @property
    def domain(self) -> str:
        return self.recipient.rpartition("@")[2].lower()


@dataclass(frozen=True)
class QueueUpdate:
    """What the queue runner records about one claimed row after an attempt.

    `remove` (delivered, or bounced) deletes the row; otherwise it goes back
    to "queued" (or stays "held" if an admin held it meanwhile) for `next_attempt`.
    """

    id: int
    remove: bool
    next_attempt: float = 0.0
    last_error: str = ""
    warned: bool = False


@dataclass
class QueueFiling:
    """Mail the runner makes (a DSN) for some rows, filed in the same transaction as their updates.

    Filed only if at least one of `row_ids` still exists (an admin may have deleted the message).
    """

    row_ids: tuple[int, ...]
    batch: DeliveryBatch


@dataclass
class LocalDelivery:
    """One message for one local account, as the spool hands it over."""

    queue_id: str
    recipient: str  # the envelope address the sender used
    account_address: str  # the account it resolved to
    mailbox: str = "INBOX"
    flags: tuple[str, ...] = ()


@dataclass
class RemoteDelivery:
    queue_id: str
    sender: str
    recipient: str
    user: str = ""  # the authenticated sender, if any: bounces count against its account (outbound/compromise.py)
    hold: str = ""  # why this copy is held (the account is on hold); "" = send


@dataclass
class DeliveryBatch:
    """Messages made durable by the spool, to be filed in one transaction."""

    local: list[tuple[LocalDelivery, bytes]] = field(default_factory=list)
    remote: list[tuple[RemoteDelivery, bytes]] = field(default_factory=list)
    dmarc: list[DmarcRecord] = field(default_factory=list)
    quarantine: list[tuple[QuarantineItem, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class QuarantineItem:
    """A message the verdict held (Action.QUARANTINE): filed into `quarantine`, not into any mailbox."""

    queue_id: str
    sender: str
    local: tuple[tuple[str, str], ...]  # (envelope recipient, account)
    remote: tuple[str, ...]  # forwarding targets, queued only on release
    reason: str
    verdict: str = ""  # JSON: the verdict's explanation (Verdict.as_dict)


@dataclass(frozen=True)
class QuarantineEntry:
    id: int
    queue_id: str
    sender: str
    users: tuple[str, ...]  # the local accounts it was for
    local: tuple[tuple[str, str], ...]
    remote: tuple[str, ...]
    from_addr: str
    subject: str
    reason: str
    verdict: str
    size: int
    blob: str
    created: float
    state: str  # held, released, deleted
    notified: bool


class Quarantine(Protocol):
    """The quarantine store (pipeline/quarantine.py); held messages are filed by `Delivery.deliver`."""

    async def list_quarantine(self, state: str | None = "held", user: str | None = None) -> list[QuarantineEntry]: ...
    async def get_quarantine(self, entry_id: int) -> QuarantineEntry | None: ...
    async def release_quarantined(self, entry_id: int, batch: DeliveryBatch) -> bool: ...
    async def delete_quarantined(self, entry_id: int) -> bool: ...
    async def mark_quarantine_notified(self, ids: list[int]) -> None: ...


@dataclass(frozen=True)
class DmarcRecord:
    """What a DMARC aggregate report needs about one message (RFC 7489 §7.2)."""

    queue_id: str
    received: float
    source_ip: str
    header_from: str
    policy_domain: str
    disposition: str
    dkim_aligned: str
    spf_aligned: str
    details: str  # JSON


@dataclass(frozen=True)
class Resolution:
    """What a recipient address means here.

    kind is "hosted" (a domain we serve, with at least one target), "unknown"
    (a domain we serve, but no such user or alias) or "relay" (a domain we
    do not serve). `local` are account addresses; `remote` are addresses
    elsewhere (the relay target itself, or where an alias forwards).
    """

    kind: str
    local: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()


class Accounts(Protocol):
    async def add_domain(self, name: str) -> None: ...
    async def list_domains(self) -> list[str]: ...
    async def is_local_domain(self, name: str) -> bool: ...
    async def add_account(self, address: str, password_hash: str) -> None: ...
    async def delete_account(self, address: str) -> None: ...
    async def list_accounts(self) -> list[str]: ...
    async def get_account(self, address: str) -> Account | None: ...
    async def set_password(self, address: str, password_hash: str) -> None: ...
    async def add_alias(self, source: str, target: str) -> None: ...
    async def delete_alias(self, source: str, target: str | None) -> int: ...
    async def list_aliases(self) -> list[tuple[str, str]]: ...
    async def resolve(self, address: str, delimiter: str) -> Resolution: ...
    async def sender_addresses(self, account: str) -> set[str]: ...
    def active_signing_keys(self, domain: str) -> list[SigningKey]: ...
    async def quota_states(self, addresses: Sequence[str]) -> dict[str, QuotaState]:
        """Storage usage and quotas of accounts (storage/quota.py): one indexed read, never a SUM."""
        ...


class Mailboxes(Protocol):
    async def list_mailboxes(self, account: str) -> list[MailboxInfo]: ...
    async def list_messages(self, account: str, mailbox: str) -> list[MessageInfo]: ...
    async def read_message(self, account: str, mailbox: str, uid: int) -> bytes: ...


class DmarcStore(Protocol):
    async def record_dmarc(self, records: list[DmarcRecord]) -> None: ...
    async def dmarc_records(self, since: float) -> list[DmarcRecord]: ...


class Queue(Protocol):
    async def list_queue(self) -> list[QueueEntry]: ...
    async def delete_queued(self, queue_id: str) -> int: ...
    async def claim_due(self, now: float, max_messages: int, lease_until: float, owner: int) -> list[QueueEntry]: ...
    async def finish_queued(self, updates: list[QueueUpdate], filings: list[QueueFiling]) -> int: ...
    async def requeue_sending(self, owner: int | None = None, lapsed_before: float | None = None) -> int: ...
    async def next_due(self) -> float | None: ...
    async def flush_queue(self, now: float) -> int: ...
    async def hold_queued(self, queue_id: str) -> int: ...
    async def release_queued(self, queue_id: str, now: float) -> int: ...


class Delivery(Protocol):
    async def deliver(self, batch: DeliveryBatch) -> None:
        """File a batch idempotently: a (queue id, recipient) pair is filed once."""
        ...


class Blobs(Protocol):
    def write(self, name: str, data: bytes) -> None: ...
    def read(self, name: str) -> bytes: ...
    def delete(self, name: str) -> None: ...


class SpamTraining(Protocol):
    """Training events and per-user model deltas of the spam classifier (checks/spam)."""

    async def add_training_event(self, user: str, label: str, source: str, message: bytes) -> None: ...
    async def add_training_from_mailbox(
        self, account: str, mailbox: str, uids: list[int], label: str, source: str
    ) -> int: ...
    async def pending_training_events(self, limit: int) -> list[Any]: ...
    async def finish_training_events(self, ids: list[int], now: float) -> None: ...
    async def spam_user_weights(self, user: str) -> dict[int, float]: ...
    async def spam_set_weights(self, user: str, weights: dict[int, float]) -> None: ...
