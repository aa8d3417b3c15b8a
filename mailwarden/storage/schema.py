"""Tables, in SQLAlchemy Core so the same definitions serve SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 7  # 2: blob_data (small bodies in the database); 3: dkim_keys; 4: dkim_keys.retire_at;
# 5: storage quotas (domains.quota_bytes, accounts.quota_bytes and accounts.used_bytes, recounted on upgrade);
# 6: quarantine; 7: training_events, spam_weights (tables only: create_all makes them)

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

# Bumped by every change to domains, accounts or aliases, so each process
# knows when to reload its in-memory Directory (storage/directory.py).
directory_serial = Table("directory_serial", metadata, Column("serial", Integer, nullable=False))

domains = Table(
    "domains",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(253), nullable=False, unique=True),
    # Storage quota for the domain's accounts in bytes (storage/quota.py); NULL: accounts.default_quota, 0: none.
    Column("quota_bytes", Integer),
)

DOMAIN_UPGRADE_COLUMNS = (("quota_bytes", "INTEGER"),)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(320), nullable=False, unique=True),
    Column("domain_id", Integer, ForeignKey("domains.id"), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("created", Float, nullable=False),
    # Storage quota (storage/quota.py): the account's own limit in bytes (NULL: its domain's, 0: none), and the
    # sum of its messages' sizes, kept by every transaction that adds or removes messages.
    Column("quota_bytes", Integer),
    Column("used_bytes", Integer, nullable=False, default=0, server_default="0"),
)

ACCOUNT_UPGRADE_COLUMNS = (("quota_bytes", "INTEGER"), ("used_bytes", "INTEGER NOT NULL DEFAULT 0"))

aliases = Table(
    "aliases",
    metadata,
    Column("id", Integer, primary_key=True),
    # "user@domain" or "@domain" (catch-all: exists only if an admin adds it)
    Column("source", String(320), nullable=False, index=True),
    Column("target", String(320), nullable=False),
    UniqueConstraint("source", "target"),
)

mailboxes = Table(
    "mailboxes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False),
    Column("special_use", String(32)),
    Column("uidvalidity", Integer, nullable=False),
    Column("uidnext", Integer, nullable=False),
    # IMAP SUBSCRIBE/LSUB (added after schema 4: SqlStore adds it to older databases, MAILBOX_UPGRADE_COLUMNS).
    Column("subscribed", Integer, nullable=False, default=1, server_default="1"),
    # Changed by the MAILBOX_CHANGE_TRIGGERS on every insert, update or delete of the mailbox's
    # messages, whichever process or code path makes it, so IMAP can tell with one row whether the
    # message list it cached is current (added like `subscribed`).
    Column("changes", Integer, nullable=False, default=0, server_default="0"),
    UniqueConstraint("account_id", "name"),
)

MAILBOX_UPGRADE_COLUMNS = (("subscribed", "INTEGER NOT NULL DEFAULT 1"), ("changes", "INTEGER NOT NULL DEFAULT 0"))

# SQLite triggers, created (IF NOT EXISTS) at every open. A new mailbox starts at a random count, so a
# mailbox id SQLite reuses after a DELETE never matches a count cached for the mailbox that had it.
MAILBOX_CHANGE_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS mailbox_changes_new AFTER INSERT ON mailboxes BEGIN
        UPDATE mailboxes SET changes = abs(random() % 4611686018427387904) WHERE id = NEW.id; END""",
    """CREATE TRIGGER IF NOT EXISTS mailbox_changes_insert AFTER INSERT ON messages BEGIN
        UPDATE mailboxes SET changes = changes + 1 WHERE id = NEW.mailbox_id; END""",
    """CREATE TRIGGER IF NOT EXISTS mailbox_changes_update AFTER UPDATE ON messages BEGIN
        UPDATE mailboxes SET changes = changes + 1 WHERE id IN (OLD.mailbox_id, NEW.mailbox_id); END""",
    """CREATE TRIGGER IF NOT EXISTS mailbox_changes_delete AFTER DELETE ON messages BEGIN
        UPDATE mailboxes SET changes = changes + 1 WHERE id = OLD.mailbox_id; END""",
)

# The last UIDVALIDITY given to any mailbox of an account, so a mailbox deleted and
# created again (even within the same second) never reuses one (RFC 3501 §2.3.1.1).
imap_uidvalidity = Table(
    "imap_uidvalidity",
    metadata,
    Column("account_id", Integer, primary_key=True),
    Column("last", Integer, nullable=False),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mailbox_id", Integer, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False),
    Column("account_id", Integer, nullable=False),
    Column("uid", Integer, nullable=False),
    Column("queue_id", String(32), nullable=False),
    Column("size", Integer, nullable=False),
    Column("internal_date", Float, nullable=False),
    Column("flags", Text, nullable=False, default=""),
    Column("from_addr", Text, nullable=False, default=""),
    Column("subject", Text, nullable=False, default=""),
    Column("date_hdr", Text, nullable=False, default=""),
    Column("blob", Text, nullable=False),
    UniqueConstraint("mailbox_id", "uid"),
    # The idempotency key: replaying the spool after a crash files nothing twice.
    UniqueConstraint("queue_id", "account_id"),
)

# Sending counts per user and per domain in fixed windows (outbound/quotas.py).
send_counters = Table(
    "send_counters",
    metadata,
    Column("subject", String(320), primary_key=True),  # a user address or a domain
    Column("window", String(8), primary_key=True),  # "hour" or "day"
    Column("start", Integer, primary_key=True),  # window start, Unix seconds
    Column("messages", Integer, nullable=False, default=0),
    Column("recipients", Integer, nullable=False, default=0),
    Column("alerted", Integer, nullable=False, default=0),  # postmaster was told about this window
)

# Compromised-account detection (outbound/compromise.py).
login_ips = Table(
    "login_ips",
    metadata,
    Column("user", String(320), primary_key=True),
    Column("ip", String(64), primary_key=True),
    Column("last_seen", Float, nullable=False),
    Column("new_at", Float),  # when a login came from this IP while it was new to the account
)
recent_recipients = Table(
    "recent_recipients",
    metadata,
    Column("user", String(320), primary_key=True),
    Column("hash", String(32), primary_key=True),  # sha256 prefix of the address: identity, not the address
    Column("at", Float, nullable=False, index=True),
)
delivery_outcomes = Table(
    "delivery_outcomes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user", String(320), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("failed", Integer, nullable=False),
)
account_holds = Table(
    "account_holds",
    metadata,
    Column("user", String(320), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("since", Float, nullable=False),
)

# App passwords (security/app_passwords.py): named, server-generated, hashed like
# account passwords; any of them logs the account in on IMAP and SMTP.
app_passwords = Table(
    "app_passwords",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(64), nullable=False),
    Column("hash", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("last_used", Float),
    UniqueConstraint("account", "name"),
)

# Per-domain signing keys (DKIM, and ARC seals on forwarded mail). A key is
# "active" (signs, and is published) until rotation makes it "retiring"
# (published, no longer signs) and finally "retired" (may be unpublished).
dkim_keys = Table(
    "dkim_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("domain", String(253), nullable=False, index=True),
    Column("selector", String(63), nullable=False),
    Column("algorithm", String(32), nullable=False),  # rsa-sha256, ed25519-sha256
    Column("private_pem", Text, nullable=False),
    Column("public_txt", Text, nullable=False),  # the TXT record value to publish
    Column("created", Float, nullable=False),
    Column("state", String(16), nullable=False, default="active"),
    Column("retire_at", Float),  # when a "retiring" key becomes "retired" (end of the rotation overlap)
    UniqueConstraint("domain", "selector"),
)

# Bodies up to storage/blobs.INLINE_MAX; `messages.blob` / `queue.blob` hold "db:" + name.
blob_data = Table(
    "blob_data",
    metadata,
    Column("name", Text, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

queue = Table(
    "queue",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("queue_id", String(32), nullable=False, index=True),
    Column("sender", String(320), nullable=False),
    Column("recipient", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created", Float, nullable=False),
    Column("next_attempt", Float, nullable=False),
    Column("last_error", Text, nullable=False, default=""),
    Column("size", Integer, nullable=False),
    Column("blob", Text, nullable=False),
    # The queue runner (outbound/queue_runner.py): a row it is sending is "sending"
    # until `lease_until`, claimed by worker `lease_owner`; "held" rows are never sent.
    # Added after schema 3: SqlStore adds them to older databases (QUEUE_UPGRADE_COLUMNS).
    Column("lease_until", Float, nullable=False, default=0.0, server_default="0"),
    Column("lease_owner", Integer, nullable=False, default=-1, server_default="-1"),
    Column("warned", Integer, nullable=False, default=0, server_default="0"),  # delay warning sent
    UniqueConstraint("queue_id", "recipient"),
    Index("ix_queue_due", "status", "next_attempt"),
)

# Columns of `queue` that databases made before them lack, as (name, SQL type and default).
QUEUE_UPGRADE_COLUMNS = (
    ("lease_until", "FLOAT NOT NULL DEFAULT 0"),
    ("lease_owner", "INTEGER NOT NULL DEFAULT -1"),
    ("warned", "INTEGER NOT NULL DEFAULT 0"),
)


# One row per message whose DMARC policy asks for aggregate reports (rua=):
# what RFC 7489 appendix C's <record> needs, collected when the message is filed.
dmarc_results = Table(
    "dmarc_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("queue_id", String(32), nullable=False, unique=True),
    Column("received", Float, nullable=False, index=True),
    Column("source_ip", String(64), nullable=False),
    Column("header_from", String(253), nullable=False),
    Column("policy_domain", String(253), nullable=False, index=True),
    Column("disposition", String(16), nullable=False),
    Column("dkim_aligned", String(8), nullable=False),
    Column("spf_aligned", String(8), nullable=False),
    Column("details", Text, nullable=False),  # the DMARC check's details, JSON
)


# The connection guard (security/bans.py): one row per banned IP or IPv6 network.
# A row outlives its ban (active = 0) for guard.ban_memory, so the next ban of
# the same network is longer; `mailwarden ban remove` deletes the row.
guard_bans = Table(
    "guard_bans",
    metadata,
    Column("network", String(64), primary_key=True),  # CIDR, e.g. 192.0.2.7/32 or 2001:db8::/64
    Column("until", Float, nullable=False),
    Column("level", Integer, nullable=False),  # how many bans in a row (the escalation step)
    Column("reason", String(32), nullable=False),
    Column("events", Integer, nullable=False),
    Column("created", Float, nullable=False),
    Column("active", Integer, nullable=False),
)

# Ban events (failed logins, unknown recipients...) of every worker, so a threshold
# counts them all: with N workers an attacker must not get N times the tries.
guard_events = Table(
    "guard_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(400), nullable=False),  # a network (CIDR) or "account:<login>"
    Column("event", String(32), nullable=False),
    Column("at", Float, nullable=False),
    Index("guard_events_key", "key", "event", "at"),
)

# Allow and deny entries added with the CLI ("CIDR" or "LISTENER:CIDR"), next to guard.allow/guard.deny.
guard_lists = Table(
    "guard_lists",
    metadata,
    Column("kind", String(8), primary_key=True),  # "allow" or "deny"
    Column("entry", String(80), primary_key=True),
    Column("created", Float, nullable=False),
)


# Messages the verdict quarantined (pipeline/quarantine.py): held here, in no mailbox,
# until released (filed into INBOX) or deleted. One row per accepted message.
quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("queue_id", String(32), nullable=False, unique=True),  # the idempotency key of a spool replay
    Column("sender", String(320), nullable=False),
    Column("users", Text, nullable=False),  # the local accounts, space-separated
    Column("recipients", Text, nullable=False),  # JSON {"local": [[rcpt, account]], "remote": [...]}
    Column("from_addr", Text, nullable=False, default=""),
    Column("subject", Text, nullable=False, default=""),
    Column("reason", Text, nullable=False),
    Column("verdict", Text, nullable=False, default=""),  # JSON, the verdict's explanation
    Column("size", Integer, nullable=False),
    Column("blob", Text, nullable=False),
    Column("created", Float, nullable=False, index=True),
    Column("state", String(16), nullable=False, default="held"),  # held, released, deleted
    Column("notified", Integer, nullable=False, default=0),  # in a digest already
    Column("decided", Float),  # when it was released or deleted
)

# Spam classifier training (checks/spam): a message a user moved into Junk (spam) or out of it
# (ham), or a quarantine release (ham). The learner applies pending rows to the user's model and
# sets `processed`. `message` is the message as filed, cut to spam.max_scan_bytes.
training_events = Table(
    "training_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user", String(320), nullable=False),
    Column("label", String(8), nullable=False),  # "spam" or "ham"
    Column("source", String(32), nullable=False),  # imap_move, imap_copy, quarantine_release, cli, ...
    Column("message", LargeBinary, nullable=False),
    Column("created", Float, nullable=False),
    Column("processed", Float),  # NULL while pending
    Index("ix_training_pending", "processed", "id"),
)

# Per-user spam model deltas over the global model: one row per hashed feature bucket the
# user's training moved (user "" holds the site-wide deltas that apply to everyone).
spam_weights = Table(
    "spam_weights",
    metadata,
    Column("user", String(320), primary_key=True),
    Column("bucket", Integer, primary_key=True),
    Column("weight", Float, nullable=False),
)
