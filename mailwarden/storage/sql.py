"""Accounts, mailboxes and the outbound queue in SQL (SQLite by default).

Tables are SQLAlchemy Core (storage/schema.py), so PostgreSQL can replace
SQLite without touching callers. Statements run on one dedicated database
thread: SQLite allows one writer, and a single thread keeps the event loop
free without paying an event-loop hop per statement (SQLAlchemy's asyncio
layer over aiosqlite cost ~1 ms of CPU per query here; see
docs/performance.md). Hot-path lookups (RCPT, AUTH) read an in-memory
`Directory` snapshot instead of the database.
"""

from __future__ import annotations

import asyncio
import email.header
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, Engine, case, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy import inspect as sa_inspect

from mailwarden.storage import schema as t
from mailwarden.storage.blobs import DB_PREFIX, INLINE_MAX, FileBlobs, is_inline
from mailwarden.storage.directory import Directory, split_address
from mailwarden.storage.interfaces import (
    SPECIAL_MAILBOXES,
    Account,
    Activity,
    AppPasswordInfo,
    DeliveryBatch,
    DmarcRecord,
    MailboxInfo,
    MessageInfo,
    QuarantineEntry,
    QueueEntry,
    QueueFiling,
    QueueUpdate,
    Resolution,
    SigningKey,
    StorageError,
    Usage,
)
from mailwarden.storage.quota import QuotaExceeded, QuotaState

_HEADER_SCAN_LIMIT = 64 * 1024
IMAP_CACHED_MESSAGES = 100_000  # message rows (a few hundred bytes each) the IMAP list cache holds per process


def data_of(items: list[Any], queue_id: str) -> bytes:
    """The body of `queue_id` in a batch's (item, data) pairs."""
    return next(data for item, data in items if item.queue_id == queue_id)


T = TypeVar("T")


def normalize_address(address: str) -> str:
    """Lower-case the whole address: local parts are matched case-insensitively here."""
    return address.strip().lower()


def header_summary(data: bytes) -> tuple[str, str, str]:
    """From, Subject and Date for listings, without the (slow) stdlib parser.

    Unfolds the three headers from the header block and decodes RFC 2047
    words only when present; hostile headers yield empty strings.
    """
    end = data.find(b"\r\n\r\n", 0, _HEADER_SCAN_LIMIT)
    head = data[: end + 2 if end >= 0 else _HEADER_SCAN_LIMIT]
    found: dict[bytes, bytes] = {}
    current: bytes | None = None
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                found[current] += b" " + line.strip()
            continue
        name, sep, value = line.partition(b":")
        key = name.strip().lower()
        if sep and key in _SUMMARY_HEADERS and key not in found:
            found[key] = value.strip()
            current = key
        else:
            current = None
    return tuple(_decode_header(found.get(k, b"")) for k in _SUMMARY_HEADERS)  # type: ignore[return-value]


_SUMMARY_HEADERS = (b"from", b"subject", b"date")


def _decode_header(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except Exception:  # malformed encoded-words: keep the raw text
            pass
    return _flat(text)


def _flat(value: Any) -> str:
    return " ".join(str(value).split())[:500]


class SqlStore:
    """Implements Accounts, Mailboxes, Queue and Delivery (storage/interfaces.py)."""

    def __init__(self, engine: Engine, blobs: FileBlobs) -> None:
        self.engine = engine
        self.blobs = blobs
        self._db = ThreadPoolExecutor(1, thread_name_prefix="db")
        self._directory: Directory | None = None
        # IMAP message lists by mailbox id, with the `changes` count they were read at; used only on
        # the database thread (imap_messages), least recently used first.
        self._imap_lists: OrderedDict[int, tuple[int, int, tuple[MessageInfo, ...]]] = OrderedDict()
        self._imap_listed = 0  # messages held in _imap_lists
        self._serial_conn: Any = None

    @classmethod
    async def open_sqlite(cls, db_path: Path, blob_root: Path) -> SqlStore:
        engine = create_engine(f"sqlite:///{db_path}", connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # SQLAlchemy emits BEGIN itself (below), not the sqlite3 module.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # A writing transaction takes SQLite's write lock up front. With a
            # deferred BEGIN, two workers could both read the same UIDNEXT and
            # both write a body file under that UID before one of them failed
            # to upgrade its lock.
            mode = "IMMEDIATE" if conn.get_execution_options().get("write") else "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

        store = cls(engine, FileBlobs(blob_root))
        await store._run(store._create_schema)
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def _tx(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) in one writing transaction on the database thread."""

        def work() -> T:
            with self.engine.connect().execution_options(write=True) as conn, conn.begin():
                return fn(conn, *args)

        return await self._run(work)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) in a read-only transaction on the database thread."""

        def work() -> T:
            with self.engine.connect() as conn:
                return fn(conn, *args)

        return await self._run(work)

    def _create_schema(self) -> None:
        with self.engine.connect().execution_options(write=True) as conn, conn.begin():
            t.metadata.create_all(conn)
            self._upgrade_queue_columns(conn)
            self._upgrade_columns(conn, "mailboxes", t.MAILBOX_UPGRADE_COLUMNS)
            self._upgrade_columns(conn, "accounts", t.ACCOUNT_UPGRADE_COLUMNS)
            self._upgrade_columns(conn, "domains", t.DOMAIN_UPGRADE_COLUMNS)
            if conn.dialect.name == "sqlite":
                for trigger in t.MAILBOX_CHANGE_TRIGGERS:
                    conn.execute(text(trigger))
            version = conn.execute(select(t.schema_version.c.version)).scalar()
            if version is None:
                conn.execute(insert(t.schema_version).values(version=t.SCHEMA_VERSION))
            elif version > t.SCHEMA_VERSION:
                raise StorageError(f"database schema {version} is newer than this Mailwarden ({t.SCHEMA_VERSION})")
            elif version < t.SCHEMA_VERSION:  # other changes only added tables, which create_all made
                if version == 3:  # 4: key rotation's retire time (older versions had no dkim_keys: create_all made it)
                    conn.execute(text("ALTER TABLE dkim_keys ADD COLUMN retire_at FLOAT"))
                if version < 5:  # 5: the usage counter starts from the messages already stored
                    self._recount_usage(conn, None)
                conn.execute(update(t.schema_version).values(version=t.SCHEMA_VERSION))
            if conn.execute(select(t.directory_serial.c.serial)).first() is None:
                conn.execute(insert(t.directory_serial).values(serial=1))

    @staticmethod
    def _upgrade_queue_columns(conn: Connection) -> None:
        """Add the queue runner's columns to a `queue` table made before them.

        Runs at every open, whatever the schema version says (one catalogue
        read): it only adds what is missing, so it composes with any version bump.
        """
        have = {c["name"] for c in sa_inspect(conn).get_columns("queue")}
        missing = [(name, ddl) for name, ddl in t.QUEUE_UPGRADE_COLUMNS if name not in have]
        for name, ddl in missing:
            conn.execute(text(f"ALTER TABLE queue ADD COLUMN {name} {ddl}"))
        if missing:
            conn.execute(text("CREATE INDEX IF NOT EXISTS ix_queue_due ON queue (status, next_attempt)"))

    @staticmethod
    def _upgrade_columns(conn: Connection, table: str, columns: tuple[tuple[str, str], ...]) -> None:
        """Add columns a table made by an older version lacks (checked at every open, like the queue's)."""
        have = {c["name"] for c in sa_inspect(conn).get_columns(table)}
        for name, ddl in columns:
            if name not in have:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))

    async def close(self) -> None:
        if self._serial_conn is not None:
            self._serial_conn.close()
        await self._run(self.engine.dispose)
        self._db.shutdown(wait=True)

    # ---- the directory snapshot ----------------------------------------

    def directory(self) -> Directory:
        """The current snapshot; one indexed read to learn whether it is stale."""
        if self._serial_conn is None:
            self._serial_conn = self.engine.raw_connection()
        cur = self._serial_conn.cursor()
        try:
            cur.execute("SELECT serial FROM directory_serial")
            serial = cur.fetchone()[0]
        finally:
            cur.close()
        self._serial_conn.commit()  # end the read transaction so the next read sees new commits
        if self._directory is None or self._directory.serial != serial:
            with self.engine.connect() as conn:
                self._directory = Directory.build(
                    serial,
                    (r[0] for r in conn.execute(select(t.domains.c.name))),
                    (
                        Account(*r)
                        for r in conn.execute(select(t.accounts.c.id, t.accounts.c.address, t.accounts.c.password_hash))
                    ),
                    ((r[0], r[1]) for r in conn.execute(select(t.aliases.c.source, t.aliases.c.target))),
                    self._signing_keys(conn),
                )
        return self._directory

    @staticmethod
    def _bump(conn: Connection) -> None:
        conn.execute(update(t.directory_serial).values(serial=t.directory_serial.c.serial + 1))

    # ---- Accounts -------------------------------------------------------

    @staticmethod
    def _domain_id(conn: Connection, name: str) -> int | None:
        return conn.execute(select(t.domains.c.id).where(t.domains.c.name == name)).scalar()

    @staticmethod
    def _account_id(conn: Connection, address: str) -> int | None:
        return conn.execute(select(t.accounts.c.id).where(t.accounts.c.address == address)).scalar()

    async def add_domain(self, name: str) -> None:
        name = normalize_address(name).rstrip(".")
        if not name or "@" in name or "." not in name or " " in name:
            raise StorageError(f"not a domain name: {name!r}")

        def work(conn: Connection) -> None:
            if self._domain_id(conn, name) is not None:
                raise StorageError(f"domain {name} already exists")
            conn.execute(insert(t.domains).values(name=name))
            self._bump(conn)

        await self._tx(work)

    # ---- signing keys ---------------------------------------------------

    @staticmethod
    def _signing_keys(conn: Connection, domain: str | None = None) -> list[SigningKey]:
        c = t.dkim_keys.c
        query = select(c.domain, c.selector, c.algorithm, c.private_pem, c.public_txt, c.created, c.state, c.retire_at)
        if domain is not None:
            query = query.where(c.domain == domain)
        return [SigningKey(*r) for r in conn.execute(query.order_by(c.created, c.id))]

    async def signing_keys(self, domain: str) -> list[SigningKey]:
        """Every key of `domain`, oldest first, whatever its state."""
        return await self._read(self._signing_keys, normalize_address(domain))

    def active_signing_keys(self, domain: str) -> list[SigningKey]:
        """The keys that sign for `domain` now, from the directory snapshot (no query)."""
        return self.directory().signing_keys.get(normalize_address(domain), [])

    async def add_signing_keys(self, keys: list[SigningKey]) -> None:
        def work(conn: Connection) -> None:
            for key in keys:
                if self._domain_id(conn, key.domain) is None:
                    raise StorageError(f"no such domain {key.domain}")
            conn.execute(insert(t.dkim_keys), [asdict(k) for k in keys])
            self._bump(conn)

        await self._tx(work)

    async def rotate_signing_keys(self, domain: str, new_keys: list[SigningKey], retire_at: float) -> list[SigningKey]:
        """In one transaction: `domain`'s active keys become retiring (until `retire_at`), `new_keys` active.

        Returns the keys now retiring. The directory serial is bumped, so every
        worker signs with the new keys from its next message on.
        """
        domain = normalize_address(domain)
        c = t.dkim_keys.c

        def work(conn: Connection) -> list[SigningKey]:
            if self._domain_id(conn, domain) is None:
                raise StorageError(f"no such domain {domain}")
            if any(k.domain != domain for k in new_keys):
                raise StorageError(f"new keys must all be {domain}'s")
            old = [k for k in self._signing_keys(conn, domain) if k.state == "active"]
            active = (c.domain == domain) & (c.state == "active")
            conn.execute(update(t.dkim_keys).where(active).values(state="retiring", retire_at=retire_at))
            taken = {k.selector for k in self._signing_keys(conn, domain)}
            if taken & {k.selector for k in new_keys}:
                raise StorageError(f"selector already used for {domain}")
            conn.execute(insert(t.dkim_keys), [asdict(k) for k in new_keys])
            self._bump(conn)
            return [replace(k, state="retiring", retire_at=retire_at) for k in old]

        return await self._tx(work)

    async def retire_signing_keys(self, now: float) -> list[SigningKey]:
        """Retiring keys whose overlap ended by `now` become retired; returns them.

        No directory bump: the directory holds active keys only.
        """
        c = t.dkim_keys.c

        def work(conn: Connection) -> list[SigningKey]:
            due = [k for k in self._signing_keys(conn) if k.state == "retiring" and (k.retire_at or 0.0) <= now]
            if due:
                ended = (c.state == "retiring") & (func.coalesce(c.retire_at, 0.0) <= now)
                conn.execute(update(t.dkim_keys).where(ended).values(state="retired"))
            return [replace(k, state="retired") for k in due]

        return await self._tx(work)

    async def list_domains(self) -> list[str]:
        return sorted(self.directory().domains)

    async def is_local_domain(self, name: str) -> bool:
        return normalize_address(name) in self.directory().domains

    async def add_account(self, address: str, password_hash: str) -> None:
        address = normalize_address(address)
        _, domain = split_address(address)

        def work(conn: Connection) -> None:
            domain_id = self._domain_id(conn, domain)
            if domain_id is None:
                raise StorageError(f"domain {domain} is not hosted here; add it with `domain add`")
            if self._account_id(conn, address) is not None:
                raise StorageError(f"user {address} already exists")
            if conn.execute(select(t.aliases.c.id).where(t.aliases.c.source == address)).first():
                raise StorageError(f"{address} is an alias; delete the alias first")
            res = conn.execute(
                insert(t.accounts).values(
                    address=address, domain_id=domain_id, password_hash=password_hash, created=time.time()
                )
            )
            account_id = res.inserted_primary_key[0]
            uidvalidity = int(time.time())
            conn.execute(
                insert(t.mailboxes),
                [
                    {
                        "account_id": account_id,
                        "name": name,
                        "special_use": special,
                        "uidvalidity": uidvalidity,
                        "uidnext": 1,
                    }
                    for name, special in SPECIAL_MAILBOXES
                ],
            )
            self._bump(conn)

        await self._tx(work)

    async def delete_account(self, address: str) -> None:
        address = normalize_address(address)

        def work(conn: Connection) -> list[str]:
            account_id = self._account_id(conn, address)
            if account_id is None:
                raise StorageError(f"no such user {address}")
            blobs = [r[0] for r in conn.execute(select(t.messages.c.blob).where(t.messages.c.account_id == account_id))]
            conn.execute(delete(t.messages).where(t.messages.c.account_id == account_id))
            conn.execute(delete(t.mailboxes).where(t.mailboxes.c.account_id == account_id))
            conn.execute(delete(t.app_passwords).where(t.app_passwords.c.account == account_id))
            conn.execute(delete(t.training_events).where(t.training_events.c.user == address))  # their mail
            conn.execute(delete(t.spam_weights).where(t.spam_weights.c.user == address))
            conn.execute(delete(t.accounts).where(t.accounts.c.id == account_id))
            self._bump(conn)
            return self._delete_inline(conn, blobs)

        for name in await self._tx(work):
            self.blobs.delete(name)

    async def list_accounts(self) -> list[str]:
        return sorted(self.directory().accounts)

    async def get_account(self, address: str) -> Account | None:
        return self.directory().accounts.get(normalize_address(address))

    async def set_password(self, address: str, password_hash: str) -> None:
        address = normalize_address(address)

        def work(conn: Connection) -> None:
            res = conn.execute(
                update(t.accounts).where(t.accounts.c.address == address).values(password_hash=password_hash)
            )
            if res.rowcount == 0:
                raise StorageError(f"no such user {address}")
            self._bump(conn)

        await self._tx(work)

    # ---- app passwords (security/app_passwords.py) ----------------------

    async def add_app_password(self, address: str, name: str, password_hash: str, limit: int) -> None:
        """Store a named app password; names are unique per user, at most `limit` per user."""
        address = normalize_address(address)
        name = name.strip()
        if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
            raise StorageError("an app password name is 1 to 64 printable characters")

        def work(conn: Connection) -> None:
            account_id = self._account_id(conn, address)
            if account_id is None:
                raise StorageError(f"no such user {address}")
            ap = t.app_passwords
            names = [r[0] for r in conn.execute(select(ap.c.name).where(ap.c.account == account_id))]
            if name in names:
                raise StorageError(f"{address} already has an app password named {name!r}")
            if len(names) >= limit:
                raise StorageError(f"{address} has {len(names)} app passwords, the most allowed; revoke one first")
            conn.execute(insert(ap).values(account=account_id, name=name, hash=password_hash, created=time.time()))

        await self._tx(work)

    async def list_app_passwords(self, address: str) -> list[AppPasswordInfo]:
        address = normalize_address(address)

        def work(conn: Connection) -> list[AppPasswordInfo]:
            account_id = self._account_id(conn, address)
            if account_id is None:
                raise StorageError(f"no such user {address}")
            ap = t.app_passwords
            rows = conn.execute(
                select(ap.c.name, ap.c.created, ap.c.last_used).where(ap.c.account == account_id).order_by(ap.c.name)
            )
            return [AppPasswordInfo(r.name, r.created, r.last_used) for r in rows]

        return await self._read(work)

    async def revoke_app_password(self, address: str, name: str) -> bool:
        address = normalize_address(address)

        def work(conn: Connection) -> bool:
            account_id = self._account_id(conn, address)
            if account_id is None:
                raise StorageError(f"no such user {address}")
            ap = t.app_passwords
            return conn.execute(delete(ap).where(ap.c.account == account_id, ap.c.name == name.strip())).rowcount > 0

        return await self._tx(work)

    async def app_password_hashes(self, address: str, limit: int = 20) -> list[tuple[int, str]]:
        """(id, hash) of a user's app passwords, oldest first, for login; [] for an unknown user."""
        address = normalize_address(address)
        ap = t.app_passwords

        def work(conn: Connection) -> list[tuple[int, str]]:
            rows = conn.execute(
                select(ap.c.id, ap.c.hash)
                .join(t.accounts, t.accounts.c.id == ap.c.account)
                .where(t.accounts.c.address == address)
                .order_by(ap.c.id)
                .limit(limit)
            )
            return [(r[0], r[1]) for r in rows]

        return await self._read(work)

    async def touch_app_password(self, app_id: int, now: float) -> None:
        def work(conn: Connection) -> None:
            conn.execute(update(t.app_passwords).where(t.app_passwords.c.id == app_id).values(last_used=now))

        await self._tx(work)

    async def add_alias(self, source: str, target: str) -> None:
        source, target = normalize_address(source), normalize_address(target)
        local, at, domain = source.rpartition("@")
        split_address(target)

        def work(conn: Connection) -> None:
            if not at or self._domain_id(conn, domain) is None:
                raise StorageError(f"alias source {source} must be in a hosted domain")
            if local and self._account_id(conn, source) is not None:
                raise StorageError(f"{source} is a user; an alias cannot shadow it")
            if conn.execute(
                select(t.aliases.c.id).where(t.aliases.c.source == source, t.aliases.c.target == target)
            ).first():
                raise StorageError(f"alias {source} -> {target} already exists")
            conn.execute(insert(t.aliases).values(source=source, target=target))
            self._bump(conn)

        await self._tx(work)

    async def delete_alias(self, source: str, target: str | None) -> int:
        cond = t.aliases.c.source == normalize_address(source)
        if target:
            cond = cond & (t.aliases.c.target == normalize_address(target))

        def work(conn: Connection) -> int:
            n = conn.execute(delete(t.aliases).where(cond)).rowcount
            self._bump(conn)
            return n

        return await self._tx(work)

    async def list_aliases(self) -> list[tuple[str, str]]:
        d = self.directory()
        return sorted((s, tg) for s, targets in d.aliases.items() for tg in targets)

    async def resolve(self, address: str, delimiter: str) -> Resolution:
        return self.directory().resolve(address, delimiter)

    async def sender_addresses(self, account: str) -> set[str]:
        return self.directory().sender_addresses(account)

    # ---- Mailboxes ------------------------------------------------------

    @staticmethod
    def _mailbox_row(conn: Connection, account: str, mailbox: str) -> Any:
        row = conn.execute(
            select(t.mailboxes)
            .join(t.accounts, t.accounts.c.id == t.mailboxes.c.account_id)
            .where(t.accounts.c.address == normalize_address(account), t.mailboxes.c.name == mailbox)
        ).first()
        if row is None:
            raise StorageError(f"no mailbox {mailbox!r} for {account}")
        return row

    async def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        def work(conn: Connection) -> list[MailboxInfo]:
            account_id = self._account_id(conn, normalize_address(account))
            if account_id is None:
                raise StorageError(f"no such user {account}")
            counts = (
                select(t.messages.c.mailbox_id, func.count().label("n")).group_by(t.messages.c.mailbox_id).subquery()
            )
            rows = conn.execute(
                select(t.mailboxes, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.mailbox_id == t.mailboxes.c.id)
                .where(t.mailboxes.c.account_id == account_id)
                .order_by(t.mailboxes.c.id)
            )
            return [MailboxInfo(r.id, r.name, r.special_use, r.uidvalidity, r.uidnext, r[-1]) for r in rows]

        return await self._read(work)

    async def list_messages(self, account: str, mailbox: str) -> list[MessageInfo]:
        def work(conn: Connection) -> list[MessageInfo]:
            box = self._mailbox_row(conn, account, mailbox)
            rows = conn.execute(select(t.messages).where(t.messages.c.mailbox_id == box.id).order_by(t.messages.c.uid))
            return [self._message_info(r) for r in rows]

        return await self._read(work)

    async def read_message(self, account: str, mailbox: str, uid: int) -> bytes:
        def work(conn: Connection) -> bytes:
            box = self._mailbox_row(conn, account, mailbox)
            blob = conn.execute(
                select(t.messages.c.blob).where(t.messages.c.mailbox_id == box.id, t.messages.c.uid == uid)
            ).scalar()
            if blob is None:
                raise StorageError(f"no message with UID {uid} in {mailbox}")
            return self._read_blob(conn, blob)

        return await self._read(work)

    async def read_blob(self, stored: str) -> bytes:
        """A body by the name a mailbox or queue row holds (`MessageInfo.blob`, `QueueEntry.blob`)."""
        return await self._read(self._read_blob, stored)

    async def read_blobs(self, stored: Sequence[str]) -> list[bytes | None]:
        """Several bodies in one trip to the database thread (IMAP FETCH); None for one that is gone."""

        def work(conn: Connection) -> list[bytes | None]:
            inline = [name for name in stored if is_inline(name)]
            found: dict[str, bytes] = {}
            for i in range(0, len(inline), 500):
                rows = conn.execute(
                    select(t.blob_data.c.name, t.blob_data.c.data).where(t.blob_data.c.name.in_(inline[i : i + 500]))
                )
                found.update((r.name, bytes(r.data)) for r in rows)
            out: list[bytes | None] = []
            for name in stored:
                if is_inline(name):
                    out.append(found.get(name))
                    continue
                try:
                    out.append(self.blobs.read(name))
                except (OSError, StorageError):
                    out.append(None)
            return out

        return await self._read(work)

    def _read_blob(self, conn: Connection, stored: str) -> bytes:
        if not is_inline(stored):
            return self.blobs.read(stored)
        data = conn.execute(select(t.blob_data.c.data).where(t.blob_data.c.name == stored)).scalar()
        if data is None:
            raise StorageError(f"message body {stored} is missing")
        return bytes(data)

    def _stage_blob(self, name: str, data: bytes, inline: list[dict[str, Any]]) -> str:
        """Store a new body: small ones become rows (inserted by the caller, in its transaction), large ones files."""
        if len(data) <= INLINE_MAX:
            stored = DB_PREFIX + name
            inline.append({"name": stored, "data": data})
            return stored
        self.blobs.write(name, data)
        return name

    def _delete_inline(self, conn: Connection, stored: list[str] | set[str]) -> list[str]:
        """Delete the inline bodies among `stored` now; return the file names, to delete after commit."""
        rows = [name for name in stored if is_inline(name)]
        for i in range(0, len(rows), 500):
            conn.execute(delete(t.blob_data).where(t.blob_data.c.name.in_(rows[i : i + 500])))
        return [name for name in stored if not is_inline(name)]

    # ---- IMAP (endpoints/imap.py) -------------------------------------------
    #
    # Mailboxes are addressed by id once selected (a RENAME keeps the id). Every
    # message row's body is named after its (mailbox, UID), so a body is never
    # shared: COPY writes a new one, EXPUNGE deletes it.

    @staticmethod
    def _message_info(r: Any) -> MessageInfo:
        return MessageInfo(
            r.uid,
            r.size,
            r.internal_date,
            tuple(r.flags.split()),
            r.from_addr,
            r.subject,
            r.date_hdr,
            r.blob,
            r.queue_id,
        )

    @staticmethod
    def _box_info(conn: Connection, r: Any) -> MailboxInfo:
        n = conn.execute(select(func.count()).where(t.messages.c.mailbox_id == r.id)).scalar() or 0
        return MailboxInfo(r.id, r.name, r.special_use, r.uidvalidity, r.uidnext, n)

    def _account_or_fail(self, conn: Connection, account: str) -> int:
        account_id = self._account_id(conn, normalize_address(account))
        if account_id is None:
            raise StorageError(f"no such user {account}")
        return account_id

    @staticmethod
    def _box_by_name(conn: Connection, account_id: int, name: str) -> Any:
        return conn.execute(
            select(t.mailboxes).where(t.mailboxes.c.account_id == account_id, t.mailboxes.c.name == name)
        ).first()

    async def imap_mailboxes(self, account: str) -> list[tuple[MailboxInfo, bool]]:
        """Every mailbox of an account with its subscription flag, by name."""

        def work(conn: Connection) -> list[tuple[MailboxInfo, bool]]:
            account_id = self._account_or_fail(conn, account)
            rows = conn.execute(
                select(t.mailboxes).where(t.mailboxes.c.account_id == account_id).order_by(t.mailboxes.c.name)
            )
            return [
                (MailboxInfo(r.id, r.name, r.special_use, r.uidvalidity, r.uidnext, 0), bool(r.subscribed))
                for r in rows
            ]

        return await self._read(work)

    async def imap_mailbox(self, account: str, name: str) -> MailboxInfo | None:
        def work(conn: Connection) -> MailboxInfo | None:
            row = self._box_by_name(conn, self._account_or_fail(conn, account), name)
            return None if row is None else self._box_info(conn, row)

        return await self._read(work)

    async def imap_messages(self, mailbox_id: int) -> tuple[MailboxInfo | None, list[MessageInfo]]:
        """A mailbox (None once deleted) and its messages by UID, read in one transaction."""

        def work(conn: Connection) -> tuple[MailboxInfo | None, list[MessageInfo]]:
            box = conn.execute(select(t.mailboxes).where(t.mailboxes.c.id == mailbox_id)).first()
            if box is None:
                return None, []
            msgs = self._imap_list(conn, box)
            return MailboxInfo(box.id, box.name, box.special_use, box.uidvalidity, box.uidnext, len(msgs)), list(msgs)

        return await self._read(work)

    def _imap_list(self, conn: Connection, box: Any) -> tuple[MessageInfo, ...]:
        """A mailbox's messages by UID: the cached list while the mailbox's `changes` count is unchanged.

        IMAP compares the selected mailbox with the store after nearly every command; reading one
        mailbox row instead of every message row is what keeps that cheap. Triggers change the count
        in the same transaction as any change to the messages, and this reads both in one transaction,
        so a cached list is never older than the count it is filed under."""
        key = (box.changes, box.uidvalidity)
        cached = self._imap_lists.get(box.id)
        if cached is not None and cached[:2] == key:
            self._imap_lists.move_to_end(box.id)
            return cached[2]
        rows = conn.execute(select(t.messages).where(t.messages.c.mailbox_id == box.id).order_by(t.messages.c.uid))
        msgs = tuple(self._message_info(r) for r in rows)
        if cached is not None:
            self._imap_listed -= len(cached[2])
        self._imap_lists[box.id] = (*key, msgs)
        self._imap_lists.move_to_end(box.id)
        self._imap_listed += len(msgs)
        while self._imap_listed > IMAP_CACHED_MESSAGES and len(self._imap_lists) > 1:
            _, (_, _, dropped) = self._imap_lists.popitem(last=False)
            self._imap_listed -= len(dropped)
        return msgs

    @staticmethod
    def _imap_changes(conn: Connection, mailbox_id: int) -> int | None:
        return conn.execute(select(t.mailboxes.c.changes).where(t.mailboxes.c.id == mailbox_id)).scalar()

    def _imap_patch(
        self,
        conn: Connection,
        mailbox_id: int,
        before: int | None,
        edit: Callable[[tuple[MessageInfo, ...]], tuple[MessageInfo, ...]],
    ) -> None:
        """Apply a writing transaction's own change to the cached list, at the end of that transaction.

        Only when the cache holds the list as of `before` (the count when the transaction, which holds
        the write lock, began): then `edit` of it is exactly the list at the count now. A session's
        STORE or APPEND thus does not make its next command reread the whole mailbox. Should the
        commit fail, the database keeps `before`, which no longer matches, and the list is reread."""
        cached = self._imap_lists.get(mailbox_id)
        if cached is None or cached[0] != before:
            return
        after = self._imap_changes(conn, mailbox_id)
        if after is None:
            return
        msgs = edit(cached[2])
        self._imap_listed += len(msgs) - len(cached[2])
        self._imap_lists[mailbox_id] = (after, cached[1], msgs)

    @staticmethod
    def _new_uidvalidity(conn: Connection, account_id: int) -> int:
        last = conn.execute(
            select(t.imap_uidvalidity.c.last).where(t.imap_uidvalidity.c.account_id == account_id)
        ).scalar()
        highest = conn.execute(
            select(func.max(t.mailboxes.c.uidvalidity)).where(t.mailboxes.c.account_id == account_id)
        ).scalar()
        value = max(int(time.time()), (last or 0) + 1, (highest or 0) + 1) & 0xFFFFFFFF or 1
        if last is None:
            conn.execute(insert(t.imap_uidvalidity).values(account_id=account_id, last=value))
        else:
            conn.execute(
                update(t.imap_uidvalidity).where(t.imap_uidvalidity.c.account_id == account_id).values(last=value)
            )
        return value

    async def imap_create_mailbox(self, account: str, name: str) -> None:
        def work(conn: Connection) -> None:
            account_id = self._account_or_fail(conn, account)
            if self._box_by_name(conn, account_id, name) is not None:
                raise StorageError(f"mailbox {name!r} already exists")
            conn.execute(
                insert(t.mailboxes).values(
                    account_id=account_id,
                    name=name,
                    special_use=None,
                    uidvalidity=self._new_uidvalidity(conn, account_id),
                    uidnext=1,
                    subscribed=1,
                )
            )

        await self._tx(work)

    def _drop_messages(self, conn: Connection, where: Any) -> tuple[list[int], list[str]]:
        """Delete message rows and their inline bodies; (UIDs, body files to delete after commit)."""
        c = t.messages.c
        rows = conn.execute(select(c.id, c.uid, c.blob, c.account_id, c.size).where(where)).all()
        ids = [r.id for r in rows]
        for i in range(0, len(ids), 500):
            conn.execute(delete(t.messages).where(t.messages.c.id.in_(ids[i : i + 500])))
        freed: dict[int, int] = {}
        for r in rows:
            freed[r.account_id] = freed.get(r.account_id, 0) - r.size
        self._charge(conn, freed)
        return [r.uid for r in rows], self._delete_inline(conn, [r.blob for r in rows])

    async def imap_delete_mailbox(self, account: str, name: str) -> None:
        def work(conn: Connection) -> list[str]:
            box = self._box_by_name(conn, self._account_or_fail(conn, account), name)
            if box is None:
                raise StorageError(f"no mailbox {name!r}")
            _, files = self._drop_messages(conn, t.messages.c.mailbox_id == box.id)
            conn.execute(delete(t.mailboxes).where(t.mailboxes.c.id == box.id))
            return files

        for f in await self._tx(work):
            self.blobs.delete(f)

    async def imap_rename_mailbox(self, account: str, old: str, new: str, delimiter: str = "/") -> None:
        """Rename a mailbox and its inferiors (`old/...`); ids, UIDs and UIDVALIDITY stay."""

        def work(conn: Connection) -> None:
            account_id = self._account_or_fail(conn, account)
            box = self._box_by_name(conn, account_id, old)
            if box is None:
                raise StorageError(f"no mailbox {old!r}")
            if self._box_by_name(conn, account_id, new) is not None:
                raise StorageError(f"mailbox {new!r} already exists")
            prefix = old + delimiter
            kids = conn.execute(
                select(t.mailboxes.c.id, t.mailboxes.c.name).where(t.mailboxes.c.account_id == account_id)
            ).all()
            for kid in kids:
                if kid.name.startswith(prefix):
                    renamed = new + delimiter + kid.name[len(prefix) :]
                    if self._box_by_name(conn, account_id, renamed) is not None:
                        raise StorageError(f"mailbox {renamed!r} already exists")
                    conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == kid.id).values(name=renamed))
            conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == box.id).values(name=new))

        await self._tx(work)

    async def imap_subscribe(self, account: str, name: str, subscribed: bool) -> None:
        def work(conn: Connection) -> None:
            box = self._box_by_name(conn, self._account_or_fail(conn, account), name)
            if box is None:
                raise StorageError(f"no mailbox {name!r}")
            conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == box.id).values(subscribed=int(subscribed)))

        await self._tx(work)

    async def imap_store_flags(
        self, mailbox_id: int, uids: Sequence[int], op: str, flags: Sequence[str]
    ) -> dict[int, tuple[str, ...]]:
        """Add ("+"), remove ("-") or replace ("") flags, in one transaction (so concurrent
        sessions never lose each other's changes); the resulting flags of every message found."""

        def work(conn: Connection) -> dict[int, tuple[str, ...]]:
            before = self._imap_changes(conn, mailbox_id)
            changed: set[int] = set()
            out: dict[int, tuple[str, ...]] = {}
            wanted = list(uids)
            for i in range(0, len(wanted), 500):
                rows = conn.execute(
                    select(t.messages.c.id, t.messages.c.uid, t.messages.c.flags).where(
                        t.messages.c.mailbox_id == mailbox_id, t.messages.c.uid.in_(wanted[i : i + 500])
                    )
                ).all()
                for r in rows:
                    have = r.flags.split()
                    if op == "+":
                        new = have + [f for f in flags if f not in have]
                    elif op == "-":
                        new = [f for f in have if f not in flags]
                    else:
                        new = list(dict.fromkeys(flags))
                    if new != have:
                        conn.execute(update(t.messages).where(t.messages.c.id == r.id).values(flags=" ".join(new)))
                        changed.add(r.uid)
                    out[r.uid] = tuple(new)
            if changed:
                self._imap_patch(
                    conn,
                    mailbox_id,
                    before,
                    lambda msgs: tuple(replace(m, flags=out[m.uid]) if m.uid in changed else m for m in msgs),
                )
            return out

        return await self._tx(work)

    async def imap_expunge(self, mailbox_id: int, uids: Sequence[int] | None = None) -> list[int]:
        """Delete the messages flagged \\Deleted (only those among `uids` when given), bodies included."""

        def work(conn: Connection) -> tuple[list[int], list[str]]:
            rows = conn.execute(
                select(t.messages.c.uid, t.messages.c.flags).where(t.messages.c.mailbox_id == mailbox_id)
            ).all()
            allowed = None if uids is None else set(uids)
            doomed = [r.uid for r in rows if "\\Deleted" in r.flags.split() and (allowed is None or r.uid in allowed)]
            gone: list[int] = []
            files: list[str] = []
            for i in range(0, len(doomed), 500):
                g, f = self._drop_messages(
                    conn, (t.messages.c.mailbox_id == mailbox_id) & t.messages.c.uid.in_(doomed[i : i + 500])
                )
                gone += g
                files += f
            return sorted(gone), files

        gone, files = await self._tx(work)
        for f in files:
            self.blobs.delete(f)
        return gone

    def _add_message(
        self,
        conn: Connection,
        box: Any,
        data: bytes,
        flags: Sequence[str],
        internal_date: float,
        inline: list[dict[str, Any]],
    ) -> int:
        uid = conn.execute(select(t.mailboxes.c.uidnext).where(t.mailboxes.c.id == box.id)).scalar()
        from_, subject, date = header_summary(data)
        blob = self._stage_blob(f"mbox/{box.account_id}/{box.id}/{uid}.eml", data, inline)
        conn.execute(
            insert(t.messages).values(
                mailbox_id=box.id,
                account_id=box.account_id,
                uid=uid,
                queue_id="imap" + secrets.token_hex(12),
                size=len(data),
                internal_date=internal_date,
                flags=" ".join(flags),
                from_addr=from_,
                subject=subject,
                date_hdr=date,
                blob=blob,
            )
        )
        conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == box.id).values(uidnext=uid + 1))
        self._charge(conn, {box.account_id: len(data)})
        return uid

    async def imap_append(
        self,
        account: str,
        name: str,
        data: bytes,
        flags: Sequence[str],
        internal_date: float,
        default_quota: int = 0,
    ) -> tuple[int, int]:
        """File a message a client appended; (UIDVALIDITY, UID). StorageError if there is no such mailbox,
        QuotaExceeded (nothing stored) if it would take the account over its quota."""

        def work(conn: Connection) -> tuple[int, int]:
            account_id = self._account_or_fail(conn, account)
            box = self._box_by_name(conn, account_id, name)
            if box is None:
                raise StorageError(f"no mailbox {name!r}")
            self._check_quota(conn, account_id, len(data), default_quota)
            before = self._imap_changes(conn, box.id)
            inline: list[dict[str, Any]] = []
            uid = self._add_message(conn, box, data, flags, internal_date, inline)
            if inline:
                conn.execute(insert(t.blob_data), inline)
            if box.id in self._imap_lists:
                row = conn.execute(select(t.messages).where(t.messages.c.mailbox_id == box.id, t.messages.c.uid == uid))
                added = self._message_info(row.one())
                self._imap_patch(conn, box.id, before, lambda msgs: (*msgs, added))
            return box.uidvalidity, uid

        return await self._tx(work)

    async def imap_copy(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        account: str,
        dest: str,
        move: bool = False,
        default_quota: int = 0,
    ) -> tuple[int, list[int], list[int]]:
        """Copy (or move) messages to another mailbox of the account, in UID order.

        Returns (destination UIDVALIDITY, source UIDs found, their new UIDs). A
        COPY that would take the account over its quota raises QuotaExceeded and
        copies nothing; a MOVE within the account adds nothing, so it is never refused.
        """

        def work(conn: Connection) -> tuple[int, list[int], list[int], list[str]]:
            account_id = self._account_or_fail(conn, account)
            box = self._box_by_name(conn, account_id, dest)
            if box is None:
                raise StorageError(f"no mailbox {dest!r}")
            wanted = sorted(set(uids))
            rows: list[Any] = []
            for i in range(0, len(wanted), 500):
                rows += conn.execute(
                    select(t.messages).where(
                        t.messages.c.mailbox_id == mailbox_id, t.messages.c.uid.in_(wanted[i : i + 500])
                    )
                ).all()
            rows.sort(key=lambda r: r.uid)
            moving_here = move and all(r.account_id == account_id for r in rows)
            if not moving_here:
                self._check_quota(conn, account_id, sum(r.size for r in rows), default_quota)
            inline: list[dict[str, Any]] = []
            new_uids = []
            for r in rows:
                data = self._read_blob(conn, r.blob)
                new_uids.append(self._add_message(conn, box, data, r.flags.split(), r.internal_date, inline))
            if inline:
                conn.execute(insert(t.blob_data), inline)
            files: list[str] = []
            if move and box.id != mailbox_id:
                old = [r.uid for r in rows]
                for i in range(0, len(old), 500):
                    files += self._drop_messages(
                        conn, (t.messages.c.mailbox_id == mailbox_id) & t.messages.c.uid.in_(old[i : i + 500])
                    )[1]
            return box.uidvalidity, [r.uid for r in rows], new_uids, files

        validity, src, dst, files = await self._tx(work)
        for f in files:
            self.blobs.delete(f)
        return validity, src, dst

    async def imap_usage(self, account: str) -> int:
        """Octets of mail an account stores (its `used_bytes` counter)."""

        def work(conn: Connection) -> int:
            self._account_or_fail(conn, account)
            return conn.execute(
                select(t.accounts.c.used_bytes).where(t.accounts.c.address == normalize_address(account))
            ).scalar()

        return await self._read(work)

    async def imap_rename_inbox(self, account: str, new: str) -> None:
        """RENAME INBOX (RFC 3501 §6.3.5): a new mailbox takes every INBOX message, INBOX stays, empty.

        The messages keep their UIDs (the new mailbox has its own UIDVALIDITY and
        INBOX's UIDNEXT), their bodies and flags; INBOX keeps its UIDNEXT, so no UID
        is ever reused there. Usage does not change. INBOX's inferiors stay put.
        """

        def work(conn: Connection) -> None:
            account_id = self._account_or_fail(conn, account)
            inbox = self._box_by_name(conn, account_id, "INBOX")
            if inbox is None:
                raise StorageError("no INBOX")
            if self._box_by_name(conn, account_id, new) is not None:
                raise StorageError(f"mailbox {new!r} already exists")
            res = conn.execute(
                insert(t.mailboxes).values(
                    account_id=account_id,
                    name=new,
                    special_use=None,
                    uidvalidity=self._new_uidvalidity(conn, account_id),
                    uidnext=inbox.uidnext,
                    subscribed=1,
                )
            )
            conn.execute(
                update(t.messages)
                .where(t.messages.c.mailbox_id == inbox.id)
                .values(mailbox_id=res.inserted_primary_key[0])
            )

        await self._tx(work)

    # ---- storage quotas (storage/quota.py) -------------------------------
    #
    # `accounts.used_bytes` changes in the transaction that adds or removes the
    # messages (filing, APPEND, COPY, EXPUNGE, mailbox delete), so reading it is
    # one indexed read; `recount_usage` rebuilds it from the messages.

    @staticmethod
    def _charge(conn: Connection, deltas: dict[int, int]) -> None:
        for account_id, delta in deltas.items():
            if delta:
                conn.execute(
                    update(t.accounts)
                    .where(t.accounts.c.id == account_id)
                    .values(used_bytes=t.accounts.c.used_bytes + delta)
                )

    @staticmethod
    def _quota_rows(conn: Connection, where: Any) -> list[QuotaState]:
        a, d = t.accounts.c, t.domains.c
        rows = conn.execute(
            select(a.address, a.used_bytes, a.quota_bytes, d.quota_bytes.label("domain_quota"))
            .join(t.domains, d.id == a.domain_id)
            .where(where)
            .order_by(a.address)
        )
        return [QuotaState(r.address, r.used_bytes, r.quota_bytes, r.domain_quota) for r in rows]

    def _check_quota(self, conn: Connection, account_id: int, extra: int, default: int) -> None:
        """Raise QuotaExceeded (inside the caller's transaction, before it stores anything) if `extra` bytes do not fit."""
        (state,) = self._quota_rows(conn, t.accounts.c.id == account_id)
        if state.would_exceed(extra, default):
            raise QuotaExceeded(state, extra, state.limit(default))

    async def quota_states(self, addresses: Sequence[str]) -> dict[str, QuotaState]:
        """Usage and quotas of these accounts (one indexed read), by address; unknown addresses are left out."""
        wanted = sorted({normalize_address(a) for a in addresses})
        if not wanted:
            return {}
        states = await self._read(self._quota_rows, t.accounts.c.address.in_(wanted))
        return {s.address: s for s in states}

    async def quota_report(self) -> list[QuotaState]:
        """Every account's usage and quotas, by address (`user list --quota`)."""
        return await self._read(self._quota_rows, t.accounts.c.id.is_not(None))

    async def set_user_quota(self, address: str, limit: int | None) -> None:
        """The account's own quota in bytes (0: unlimited); None: use its domain's or the default."""
        address = normalize_address(address)

        def work(conn: Connection) -> None:
            res = conn.execute(update(t.accounts).where(t.accounts.c.address == address).values(quota_bytes=limit))
            if res.rowcount == 0:
                raise StorageError(f"no such user {address}")

        await self._tx(work)

    async def set_domain_quota(self, domain: str, limit: int | None) -> None:
        """The quota of a domain's accounts without their own (0: unlimited); None: accounts.default_quota."""
        domain = normalize_address(domain).rstrip(".")

        def work(conn: Connection) -> None:
            res = conn.execute(update(t.domains).where(t.domains.c.name == domain).values(quota_bytes=limit))
            if res.rowcount == 0:
                raise StorageError(f"{domain} is not a hosted domain")

        await self._tx(work)

    async def domain_quotas(self) -> dict[str, int | None]:
        def work(conn: Connection) -> dict[str, int | None]:
            return {r.name: r.quota_bytes for r in conn.execute(select(t.domains.c.name, t.domains.c.quota_bytes))}

        return await self._read(work)

    @staticmethod
    def _recount_usage(conn: Connection, account_id: int | None) -> list[tuple[str, int, int]]:
        a, m = t.accounts.c, t.messages.c
        query = select(a.id, a.address, a.used_bytes)
        if account_id is not None:
            query = query.where(a.id == account_id)
        changed = []
        for r in conn.execute(query.order_by(a.address)).all():
            real = conn.execute(select(func.coalesce(func.sum(m.size), 0)).where(m.account_id == r.id)).scalar()
            if real != r.used_bytes:
                conn.execute(update(t.accounts).where(a.id == r.id).values(used_bytes=real))
            changed.append((r.address, r.used_bytes, real))
        return changed

    async def recount_usage(self, address: str | None = None) -> list[tuple[str, int, int]]:
        """Rebuild `used_bytes` from the stored messages (one account, or all); (address, was, now) each."""

        def work(conn: Connection) -> list[tuple[str, int, int]]:
            account_id = None if address is None else self._account_or_fail(conn, address)
            return self._recount_usage(conn, account_id)

        return await self._tx(work)

    # ---- Delivery -------------------------------------------------------

    async def deliver(self, batch: DeliveryBatch) -> None:
        await self._tx(self._deliver, batch)

    def _deliver(self, conn: Connection, batch: DeliveryBatch) -> None:
        """File a batch in one transaction; (queue id, account) is filed once.

        Re-running a batch (spool replay after a crash) rewrites bodies that
        are already filed, in case the crash lost an unflushed file, and
        inserts nothing twice. Bodies are written before the transaction
        commits, so a committed row never points at a missing file.
        """
        now = time.time()
        inline: list[dict[str, Any]] = []  # new small bodies, inserted below in this transaction
        if batch.local:
            accounts = {item.account_address for item, _ in batch.local}
            boxes = {
                (r.address, r.name): r
                for r in conn.execute(
                    select(t.mailboxes, t.accounts.c.address)
                    .join(t.accounts, t.accounts.c.id == t.mailboxes.c.account_id)
                    .where(
                        t.accounts.c.address.in_(accounts),
                        t.mailboxes.c.name.in_({item.mailbox for item, _ in batch.local}),
                    )
                )
            }
            qids = {item.queue_id for item, _ in batch.local}
            filed = {
                (r.queue_id, r.account_id): r.blob
                for r in conn.execute(
                    select(t.messages.c.queue_id, t.messages.c.account_id, t.messages.c.blob).where(
                        t.messages.c.queue_id.in_(qids)
                    )
                )
            }
            uidnext: dict[int, int] = {}
            rows: list[dict[str, Any]] = []
            for item, data in batch.local:
                box = boxes.get((item.account_address, item.mailbox))
                if box is None:
                    continue  # the account was deleted after the message was accepted
                key = (item.queue_id, box.account_id)
                if key in filed:
                    if not is_inline(filed[key]):  # an inline body committed with its row
                        self.blobs.write(filed[key], data)
                    continue
                uid = uidnext.get(box.id, box.uidnext)
                uidnext[box.id] = uid + 1
                from_, subject, date = header_summary(data)
                blob = self._stage_blob(f"mbox/{box.account_id}/{box.id}/{uid}.eml", data, inline)
                filed[key] = blob
                rows.append(
                    {
                        "mailbox_id": box.id,
                        "account_id": box.account_id,
                        "uid": uid,
                        "queue_id": item.queue_id,
                        "size": len(data),
                        "internal_date": now,
                        "flags": " ".join(item.flags),
                        "from_addr": from_,
                        "subject": subject,
                        "date_hdr": date,
                        "blob": blob,
                    }
                )
            if rows:
                conn.execute(insert(t.messages), rows)
                added: dict[int, int] = {}
                for row in rows:
                    added[row["account_id"]] = added.get(row["account_id"], 0) + row["size"]
                self._charge(conn, added)
            for box_id, nxt in uidnext.items():
                conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == box_id).values(uidnext=nxt))
        if batch.remote:
            qids = {item.queue_id for item, _ in batch.remote}
            queued: set[tuple[str, str]] = set()
            bodies: dict[str, str] = {}  # queue id -> stored body name
            for r in conn.execute(
                select(t.queue.c.queue_id, t.queue.c.recipient, t.queue.c.blob).where(t.queue.c.queue_id.in_(qids))
            ):
                queued.add((r.queue_id, r.recipient))
                if r.queue_id not in bodies:
                    bodies[r.queue_id] = r.blob
                    if not is_inline(r.blob):  # a replay: the file may not have reached the disk
                        self.blobs.write(r.blob, data_of(batch.remote, r.queue_id))
            rows = []
            for item, data in batch.remote:
                blob = bodies.get(item.queue_id)
                if blob is None:
                    blob = bodies[item.queue_id] = self._stage_blob(f"queue/{item.queue_id}.eml", data, inline)
                if (item.queue_id, item.recipient) in queued:
                    continue
                queued.add((item.queue_id, item.recipient))
                rows.append(
                    {
                        "queue_id": item.queue_id,
                        "sender": item.sender,
                        "recipient": item.recipient,
                        "status": "held" if item.hold else "queued",
                        "attempts": 0,
                        "created": now,
                        "next_attempt": now,
                        "last_error": f"held: {item.hold}" if item.hold else "",
                        "size": len(data),
                        "blob": blob,
                    }
                )
            if rows:
                conn.execute(insert(t.queue), rows)
        if batch.quarantine:
            self._file_quarantine(conn, batch, now, inline)
        if inline:
            conn.execute(insert(t.blob_data), inline)
        self._insert_dmarc(conn, batch.dmarc)

    def _file_quarantine(
        self, conn: Connection, batch: DeliveryBatch, now: float, inline: list[dict[str, Any]]
    ) -> None:
        """One `quarantine` row per queue id (a spool replay adds nothing, but rewrites a body file)."""
        known = {
            r.queue_id: r.blob
            for r in conn.execute(
                select(t.quarantine.c.queue_id, t.quarantine.c.blob).where(
                    t.quarantine.c.queue_id.in_({item.queue_id for item, _ in batch.quarantine})
                )
            )
        }
        rows = []
        for item, data in batch.quarantine:
            if item.queue_id in known:
                if not is_inline(known[item.queue_id]):
                    self.blobs.write(known[item.queue_id], data)
                continue
            from_, subject, _date = header_summary(data)
            blob = self._stage_blob(f"quarantine/{item.queue_id}.eml", data, inline)
            known[item.queue_id] = blob
            rows.append(
                {
                    "queue_id": item.queue_id,
                    "sender": item.sender,
                    "users": " ".join(dict.fromkeys(account for _rcpt, account in item.local)),
                    "recipients": json.dumps({"local": [list(x) for x in item.local], "remote": list(item.remote)}),
                    "from_addr": from_,
                    "subject": subject,
                    "reason": item.reason[:2000],
                    "verdict": item.verdict[:16000],
                    "size": len(data),
                    "blob": blob,
                    "created": now,
                    "state": "held",
                    "notified": 0,
                }
            )
        if rows:
            conn.execute(insert(t.quarantine), rows)

    @staticmethod
    def _insert_dmarc(conn: Connection, records: list[DmarcRecord]) -> None:
        """Once per queue id, so a spool replay adds nothing."""
        if records:
            known = {
                r[0]
                for r in conn.execute(
                    select(t.dmarc_results.c.queue_id).where(
                        t.dmarc_results.c.queue_id.in_({d.queue_id for d in records})
                    )
                )
            }
            fresh = [asdict(d) for d in records if d.queue_id not in known]
            if fresh:
                conn.execute(insert(t.dmarc_results), fresh)

    # ---- compromised-account signals (outbound/compromise.py) ----------

    async def note_login(self, user: str, ip: str, now: float, known_days: int) -> bool:
        """Record a login; True when `ip` was not used by `user` in the last `known_days`."""

        def work(conn: Connection) -> bool:
            c = t.login_ips.c
            row = conn.execute(select(c.last_seen).where(c.user == user, c.ip == ip)).first()
            new = row is None or row.last_seen < now - known_days * 86400
            if row is None:
                conn.execute(insert(t.login_ips).values(user=user, ip=ip, last_seen=now, new_at=now))
            else:
                values: dict[str, Any] = {"last_seen": now}
                if new:
                    values["new_at"] = now
                conn.execute(update(t.login_ips).where(c.user == user, c.ip == ip).values(**values))
            if new and conn.execute(select(func.count()).select_from(t.login_ips).where(c.user == user)).scalar() == 1:
                # The account's very first login: nothing to compare with, so not "new".
                conn.execute(update(t.login_ips).where(c.user == user, c.ip == ip).values(new_at=None))
                return False
            return new

        return await self._tx(work)

    async def note_recipients(self, user: str, hashes: Sequence[str], now: float) -> None:
        def work(conn: Connection) -> None:
            c = t.recent_recipients.c
            for h in set(hashes):
                if not conn.execute(
                    update(t.recent_recipients).where(c.user == user, c.hash == h).values(at=now)
                ).rowcount:
                    conn.execute(insert(t.recent_recipients).values(user=user, hash=h, at=now))
            conn.execute(delete(t.recent_recipients).where(c.at < now - 86400))

        await self._tx(work)

    async def note_delivery(self, user: str, failed: bool, now: float) -> None:
        """One finished delivery attempt of `user`'s mail (delivered, or failed for good)."""

        def work(conn: Connection) -> None:
            conn.execute(insert(t.delivery_outcomes).values(user=user, at=now, failed=int(failed)))
            conn.execute(delete(t.delivery_outcomes).where(t.delivery_outcomes.c.at < now - 86400))

        await self._tx(work)

    async def activity(self, user: str, now: float) -> Activity:
        def work(conn: Connection) -> Activity:
            hour = now - 3600
            r, d, li = t.recent_recipients.c, t.delivery_outcomes.c, t.login_ips.c
            unique = conn.execute(
                select(func.count()).select_from(t.recent_recipients).where(r.user == user, r.at >= hour)
            ).scalar()
            attempts, failures = conn.execute(
                select(func.count(), func.coalesce(func.sum(d.failed), 0)).where(d.user == user, d.at >= hour)
            ).one()
            login = conn.execute(
                select(li.ip, li.new_at).where(li.user == user, li.new_at >= hour).order_by(li.new_at.desc())
            ).first()
            since_new = 0
            if login is not None:
                since_new = conn.execute(
                    select(func.count()).select_from(t.recent_recipients).where(r.user == user, r.at >= login.new_at)
                ).scalar()
            return Activity(unique or 0, attempts or 0, int(failures or 0), login.ip if login else None, since_new or 0)

        return await self._read(work)

    async def hold_account(self, user: str, reason: str, now: float) -> bool:
        """Put `user` on hold; False if it already was."""

        def work(conn: Connection) -> bool:
            if conn.execute(select(t.account_holds.c.user).where(t.account_holds.c.user == user)).first():
                return False
            conn.execute(insert(t.account_holds).values(user=user, reason=reason, since=now))
            return True

        return await self._tx(work)

    async def account_hold(self, user: str) -> str | None:
        return await self._read(
            lambda conn: conn.execute(select(t.account_holds.c.reason).where(t.account_holds.c.user == user)).scalar()
        )

    async def unhold_account(self, user: str) -> bool:
        """Lift the hold; the signals' history is cleared so the same numbers don't hold it again at once."""

        def work(conn: Connection) -> bool:
            n = conn.execute(delete(t.account_holds).where(t.account_holds.c.user == user)).rowcount
            conn.execute(delete(t.recent_recipients).where(t.recent_recipients.c.user == user))
            conn.execute(delete(t.delivery_outcomes).where(t.delivery_outcomes.c.user == user))
            conn.execute(update(t.login_ips).where(t.login_ips.c.user == user).values(new_at=None))
            return bool(n)

        return await self._tx(work)

    async def release_held_from(self, senders: Sequence[str]) -> int:
        """Queue again every held recipient of mail from `senders` (a user's addresses); how many."""

        def work(conn: Connection) -> int:
            c = t.queue.c
            return conn.execute(
                update(t.queue)
                .where(c.status == "held", func.lower(c.sender).in_([x.lower() for x in senders]))
                .values(status="queued", next_attempt=time.time(), last_error="")
            ).rowcount

        return await self._tx(work) if senders else 0

    # ---- sending counters (outbound/quotas.py) -------------------------

    async def send_usage(
        self, subjects: Sequence[str], windows: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, str, int], Usage]:
        """Counts for each subject in each (window, start)."""

        def work(conn: Connection) -> dict[tuple[str, str, int], Usage]:
            c = t.send_counters.c
            found: dict[tuple[str, str, int], Usage] = {}
            for window, start in windows:
                rows = conn.execute(
                    select(c.subject, c.messages, c.recipients).where(
                        c.subject.in_(list(subjects)), c.window == window, c.start == start
                    )
                )
                for r in rows:
                    found[(r.subject, window, start)] = Usage(r.messages, r.recipients)
            return found

        return await self._read(work)

    async def count_sent(self, subjects: Sequence[str], windows: Sequence[tuple[str, int]], recipients: int) -> None:
        """One more message with `recipients` recipients for each subject in each window; old windows are pruned."""

        def work(conn: Connection) -> None:
            c = t.send_counters.c
            for subject in subjects:
                for window, start in windows:
                    changed = conn.execute(
                        update(t.send_counters)
                        .where(c.subject == subject, c.window == window, c.start == start)
                        .values(messages=c.messages + 1, recipients=c.recipients + recipients)
                    ).rowcount
                    if not changed:
                        conn.execute(
                            insert(t.send_counters).values(
                                subject=subject,
                                window=window,
                                start=start,
                                messages=1,
                                recipients=recipients,
                                alerted=0,
                            )
                        )
            oldest = min(start for _, start in windows) - 2 * 86400
            conn.execute(delete(t.send_counters).where(c.start < oldest))

        await self._tx(work)

    async def mark_quota_alerted(self, subject: str, window: str, start: int) -> bool:
        """True the first time for this subject and window (the caller alerts then), False after."""

        def work(conn: Connection) -> bool:
            c = t.send_counters.c
            changed = conn.execute(
                update(t.send_counters)
                .where(c.subject == subject, c.window == window, c.start == start, c.alerted == 0)
                .values(alerted=1)
            ).rowcount
            if changed:
                return True
            exists = conn.execute(
                select(c.alerted).where(c.subject == subject, c.window == window, c.start == start)
            ).first()
            if exists is None:
                conn.execute(
                    insert(t.send_counters).values(
                        subject=subject, window=window, start=start, messages=0, recipients=0, alerted=1
                    )
                )
                return True
            return False

        return await self._tx(work)

    async def record_dmarc(self, records: list[DmarcRecord]) -> None:
        await self._tx(self._insert_dmarc, records)

    async def dmarc_records(self, since: float) -> list[DmarcRecord]:
        """Messages since `since` whose DMARC policy asked for aggregate reports."""

        def work(conn: Connection) -> list[DmarcRecord]:
            c = t.dmarc_results.c
            rows = conn.execute(
                select(
                    c.queue_id,
                    c.received,
                    c.source_ip,
                    c.header_from,
                    c.policy_domain,
                    c.disposition,
                    c.dkim_aligned,
                    c.spf_aligned,
                    c.details,
                )
                .where(c.received >= since)
                .order_by(c.received)
            )
            return [DmarcRecord(*r) for r in rows]

        return await self._read(work)

    # ---- Queue ----------------------------------------------------------

    @staticmethod
    def _queue_entry(r: Any) -> QueueEntry:
        return QueueEntry(
            r.queue_id,
            r.sender,
            r.recipient,
            r.status,
            r.attempts,
            r.created,
            r.next_attempt,
            r.last_error,
            r.size,
            r.blob,
            r.id,
            r.lease_until,
            bool(r.warned),
        )

    async def list_queue(self) -> list[QueueEntry]:
        def work(conn: Connection) -> list[QueueEntry]:
            rows = conn.execute(select(t.queue).order_by(t.queue.c.created, t.queue.c.id))
            return [self._queue_entry(r) for r in rows]

        return await self._read(work)

    async def queue_size(self) -> int:
        return await self._read(lambda conn: conn.execute(select(func.count()).select_from(t.queue)).scalar() or 0)

    async def delete_queued(self, queue_id: str) -> int:
        def work(conn: Connection) -> tuple[int, list[str]]:
            blobs = {r[0] for r in conn.execute(select(t.queue.c.blob).where(t.queue.c.queue_id == queue_id))}
            n = conn.execute(delete(t.queue).where(t.queue.c.queue_id == queue_id)).rowcount
            return n, self._delete_inline(conn, blobs)

        n, blobs = await self._tx(work)
        for name in blobs:
            self.blobs.delete(name)
        return n

    # ---- the queue runner (outbound/queue_runner.py) -------------------------

    async def claim_due(self, now: float, max_messages: int, lease_until: float, owner: int) -> list[QueueEntry]:
        """Claim the due rows of up to `max_messages` messages, oldest due first.

        The rows become "sending" with a lease, in one writing transaction
        (BEGIN IMMEDIATE on SQLite), so two workers never claim the same row.
        Every due row of a chosen message is claimed, so the runner can send
        a message's recipients at one destination in one transaction.
        """

        def work(conn: Connection) -> list[QueueEntry]:
            c = t.queue.c
            due = (c.status == "queued") & (c.next_attempt <= now)
            qids = [
                r[0]
                for r in conn.execute(
                    select(c.queue_id)
                    .where(due)
                    .group_by(c.queue_id)
                    .order_by(func.min(c.next_attempt))
                    .limit(max_messages)
                )
            ]
            if not qids:
                return []
            rows = conn.execute(select(t.queue).where(due, c.queue_id.in_(qids)).order_by(c.id)).all()
            ids = [r.id for r in rows]
            for i in range(0, len(ids), 500):
                conn.execute(
                    update(t.queue)
                    .where(c.id.in_(ids[i : i + 500]))
                    .values(status="sending", lease_until=lease_until, lease_owner=owner)
                )
            return [replace(self._queue_entry(r), status="sending", lease_until=lease_until) for r in rows]

        return await self._tx(work)

    async def finish_queued(self, updates: list[QueueUpdate], filings: list[QueueFiling]) -> int:
        """Record attempt outcomes and file the DSNs they cause, in one transaction.

        A DSN and the removal of the rows it reports commit together, so a
        crash neither loses the DSN nor sends it twice. Rows an admin deleted
        meanwhile are skipped (and so is a DSN all of whose rows are gone); a
        row an admin held meanwhile stays held. Bodies no row points at any
        more are deleted. Returns the number of rows updated or removed.
        """

        def work(conn: Connection) -> tuple[int, list[str]]:
            c = t.queue.c
            ids = [u.id for u in updates] + [i for f in filings for i in f.row_ids]
            present: dict[int, Any] = {}
            for i in range(0, len(ids), 500):
                for r in conn.execute(select(c.id, c.queue_id, c.blob).where(c.id.in_(ids[i : i + 500]))):
                    present[r.id] = r
            for filing in filings:
                if any(i in present for i in filing.row_ids):
                    self._deliver(conn, filing.batch)
            done = 0
            removed = [u.id for u in updates if u.remove and u.id in present]
            for i in range(0, len(removed), 500):
                done += conn.execute(delete(t.queue).where(c.id.in_(removed[i : i + 500]))).rowcount
            for u in updates:
                if u.remove or u.id not in present:
                    continue
                done += conn.execute(
                    update(t.queue)
                    .where(c.id == u.id)
                    .values(
                        status=case((c.status == "held", "held"), else_="queued"),
                        attempts=c.attempts + 1,
                        next_attempt=u.next_attempt,
                        last_error=u.last_error[:2000],
                        lease_until=0.0,
                        lease_owner=-1,
                        warned=case((c.warned != 0, 1), else_=1 if u.warned else 0),
                    )
                ).rowcount
            orphans: set[str] = set()
            touched = {present[i].queue_id: present[i].blob for i in removed}
            if touched:
                left = conn.execute(select(c.queue_id).where(c.queue_id.in_(list(touched))).distinct())
                still = {r[0] for r in left}
                orphans = {blob for qid, blob in touched.items() if qid not in still}
            return done, self._delete_inline(conn, orphans)

        done, files = await self._tx(work)
        for name in files:
            self.blobs.delete(name)
        return done

    async def requeue_sending(self, owner: int | None = None, lapsed_before: float | None = None) -> int:
        """Put "sending" rows back to "queued": all of them (at start, when no runner
        is alive), those of one worker (restarted, so its predecessor is dead), or
        those whose lease lapsed before a time."""

        def work(conn: Connection) -> int:
            c = t.queue.c
            cond = c.status == "sending"
            if owner is not None:
                cond = cond & (c.lease_owner == owner)
            if lapsed_before is not None:
                cond = cond & (c.lease_until < lapsed_before)
            return conn.execute(
                update(t.queue).where(cond).values(status="queued", lease_until=0.0, lease_owner=-1)
            ).rowcount

        return await self._tx(work)

    async def next_due(self) -> float | None:
        """When the earliest "queued" row is due (None: nothing waits)."""
        c = t.queue.c
        return await self._read(
            lambda conn: conn.execute(select(func.min(c.next_attempt)).where(c.status == "queued")).scalar()
        )

    async def flush_queue(self, now: float) -> int:
        """Make every "queued" row due now (`queue flush`); returns how many rows are queued."""

        def work(conn: Connection) -> int:
            c = t.queue.c
            conn.execute(update(t.queue).where(c.status == "queued", c.next_attempt > now).values(next_attempt=now))
            return conn.execute(select(func.count()).select_from(t.queue).where(c.status == "queued")).scalar() or 0

        return await self._tx(work)

    async def hold_queued(self, queue_id: str) -> int:
        """Status "held" for a message's rows: never sent until released. A row being
        sent right now finishes its attempt (delivered is delivered) but is not retried."""

        def work(conn: Connection) -> int:
            c = t.queue.c
            return conn.execute(
                update(t.queue)
                .where(c.queue_id == queue_id, c.status.in_(("queued", "sending", "held")))
                .values(status="held")
            ).rowcount

        return await self._tx(work)

    async def release_queued(self, queue_id: str, now: float) -> int:
        """Held rows go back to "queued", due at once."""

        def work(conn: Connection) -> int:
            c = t.queue.c
            return conn.execute(
                update(t.queue)
                .where(c.queue_id == queue_id, c.status == "held")
                .values(status="queued", next_attempt=now, lease_until=0.0, lease_owner=-1)
            ).rowcount

        return await self._tx(work)

    # ---- the connection guard (security/bans.py, security/guard.py) ----------

    async def guard_count_event(self, key: str, event: str, now: float, window: float) -> int:
        """Record one event for `key` and return how many it has had in the last `window` seconds, all workers'."""

        def work(conn: Connection) -> int:
            c = t.guard_events.c
            conn.execute(insert(t.guard_events).values(key=key, event=event, at=now))
            conn.execute(delete(t.guard_events).where(c.key == key, c.event == event, c.at < now - window))
            return int(
                conn.execute(
                    select(func.count()).select_from(t.guard_events).where(c.key == key, c.event == event)
                ).scalar()
                or 0
            )

        return await self._tx(work)

    async def guard_forget_events(self, key: str, before: float) -> None:
        """Drop `key`'s events (a ban starts from zero), and every event older than `before`."""

        def work(conn: Connection) -> None:
            c = t.guard_events.c
            conn.execute(delete(t.guard_events).where((c.key == key) | (c.at < before)))

        await self._tx(work)

    async def guard_active_bans(self, now: float) -> list[GuardBan]:
        """Bans in force at `now`."""

        def work(conn: Connection) -> list[GuardBan]:
            c = t.guard_bans.c
            rows = conn.execute(select(t.guard_bans).where(c.active == 1, c.until > now)).all()
            return [_guard_ban(r) for r in rows]

        return await self._read(work)

    async def guard_all_bans(self) -> list[GuardBan]:
        """Every row, ended bans (kept for escalation) included; for `ban list`."""
        return await self._read(lambda conn: [_guard_ban(r) for r in conn.execute(select(t.guard_bans)).all()])

    async def guard_ban_get(self, network: str) -> GuardBan | None:
        def work(conn: Connection) -> GuardBan | None:
            row = conn.execute(select(t.guard_bans).where(t.guard_bans.c.network == network)).first()
            return _guard_ban(row) if row is not None else None

        return await self._read(work)

    async def guard_ban_add(
        self, network: str, reason: str, events: int, now: float, durations: list[int], memory: float
    ) -> GuardBan | None:
        """Ban `network` for its next escalation step; None if it is banned already (another worker)."""

        def work(conn: Connection) -> GuardBan | None:
            c = t.guard_bans.c
            row = conn.execute(select(t.guard_bans).where(c.network == network)).first()
            if row is not None and row.active and row.until > now:
                return None
            level = row.level + 1 if row is not None and row.until > now - memory else 1
            duration = durations[min(level, len(durations)) - 1]
            values = dict(until=now + duration, level=level, reason=reason, events=events, created=now, active=1)
            if row is None:
                conn.execute(insert(t.guard_bans).values(network=network, **values))
            else:
                conn.execute(update(t.guard_bans).where(c.network == network).values(**values))
            return GuardBan(network, now + duration, level, reason, events, now, True)

        return await self._tx(work)

    async def guard_ban_set(self, network: str, until: float, reason: str, now: float) -> None:
        """An administrator's ban (`ban add`): in force until `until`, whatever was there."""

        def work(conn: Connection) -> None:
            c = t.guard_bans.c
            values = dict(until=until, reason=reason, created=now, active=1)
            if conn.execute(update(t.guard_bans).where(c.network == network).values(**values)).rowcount == 0:
                conn.execute(insert(t.guard_bans).values(network=network, level=1, events=0, **values))

        await self._tx(work)

    async def guard_ban_remove(self, network: str) -> bool:
        """Lift a ban and forget its escalation; False if there was no ban in force."""

        def work(conn: Connection) -> bool:
            c = t.guard_bans.c
            row = conn.execute(select(c.active, c.until).where(c.network == network)).first()
            conn.execute(delete(t.guard_bans).where(c.network == network))
            return row is not None and bool(row.active) and row.until > time.time()

        return await self._tx(work)

    async def guard_ban_expire(self, now: float, memory: float) -> list[str]:
        """End the bans whose time is up, returning each once across all processes; drop rows older than memory."""

        def work(conn: Connection) -> list[str]:
            c = t.guard_bans.c
            ended = [r[0] for r in conn.execute(select(c.network).where(c.active == 1, c.until <= now)).all()]
            if ended:
                conn.execute(update(t.guard_bans).where(c.network.in_(ended)).values(active=0))
            conn.execute(delete(t.guard_bans).where(c.active == 0, c.until < now - memory))
            return ended

        return await self._tx(work)

    async def guard_list_entries(self) -> list[tuple[str, str]]:
        """CLI allow/deny entries as (kind, entry)."""
        c = t.guard_lists.c
        return await self._read(
            lambda conn: [(r[0], r[1]) for r in conn.execute(select(c.kind, c.entry).order_by(c.kind, c.entry))]
        )

    async def guard_list_add(self, kind: str, entry: str, now: float) -> bool:
        def work(conn: Connection) -> bool:
            c = t.guard_lists.c
            if conn.execute(select(c.entry).where(c.kind == kind, c.entry == entry)).first():
                return False
            conn.execute(insert(t.guard_lists).values(kind=kind, entry=entry, created=now))
            return True

        return await self._tx(work)

    async def guard_list_remove(self, kind: str, entry: str) -> bool:
        c = t.guard_lists.c
        return await self._tx(
            lambda conn: conn.execute(delete(t.guard_lists).where(c.kind == kind, c.entry == entry)).rowcount > 0
        )

    # ---- quarantine (pipeline/quarantine.py) --------------------------------

    @staticmethod
    def _quarantine_entry(r: Any) -> QuarantineEntry:
        recipients = json.loads(r.recipients or "{}")
        return QuarantineEntry(
            r.id,
            r.queue_id,
            r.sender,
            tuple(r.users.split()),
            tuple((str(a), str(b)) for a, b in recipients.get("local", [])),
            tuple(recipients.get("remote", [])),
            r.from_addr,
            r.subject,
            r.reason,
            r.verdict,
            r.size,
            r.blob,
            r.created,
            r.state,
            bool(r.notified),
        )

    async def list_quarantine(self, state: str | None = "held", user: str | None = None) -> list[QuarantineEntry]:
        """Quarantined messages, oldest first; `state` None lists every state, `user` those held for one account."""

        def work(conn: Connection) -> list[QuarantineEntry]:
            q = select(t.quarantine).order_by(t.quarantine.c.id)
            if state is not None:
                q = q.where(t.quarantine.c.state == state)
            entries = [self._quarantine_entry(r) for r in conn.execute(q)]
            if user is not None:
                wanted = normalize_address(user)
                entries = [e for e in entries if wanted in e.users]
            return entries

        return await self._read(work)

    async def get_quarantine(self, entry_id: int) -> QuarantineEntry | None:
        def work(conn: Connection) -> QuarantineEntry | None:
            r = conn.execute(select(t.quarantine).where(t.quarantine.c.id == entry_id)).first()
            return None if r is None else self._quarantine_entry(r)

        return await self._read(work)

    async def release_quarantined(self, entry_id: int, batch: DeliveryBatch) -> bool:
        """Mark a held message released and file `batch` (its deliveries) in the same transaction; False if not held."""
        return await self._decide_quarantined(entry_id, "released", batch)

    async def delete_quarantined(self, entry_id: int) -> bool:
        """Drop a held message and its body; the row stays (state deleted) as the record of the decision."""
        return await self._decide_quarantined(entry_id, "deleted", None)

    async def _decide_quarantined(self, entry_id: int, state: str, batch: DeliveryBatch | None) -> bool:
        """Move a held row to `state`, file `batch` if any, and drop the held body (the mailbox copies are it now)."""

        def work(conn: Connection) -> tuple[bool, list[str]]:
            r = conn.execute(
                select(t.quarantine.c.blob).where(t.quarantine.c.id == entry_id, t.quarantine.c.state == "held")
            ).first()
            if r is None:
                return False, []
            conn.execute(
                update(t.quarantine).where(t.quarantine.c.id == entry_id).values(state=state, decided=time.time())
            )
            if batch is not None:
                self._deliver(conn, batch)
            return True, self._delete_inline(conn, [r.blob])

        done, files = await self._tx(work)
        for f in files:
            self.blobs.delete(f)
        return done

    async def mark_quarantine_notified(self, ids: list[int]) -> None:
        def work(conn: Connection) -> None:
            for i in range(0, len(ids), 500):
                conn.execute(update(t.quarantine).where(t.quarantine.c.id.in_(ids[i : i + 500])).values(notified=1))

        await self._tx(work)

    # ---- spam classifier training (checks/spam) ------------------------------

    async def add_training_event(self, user: str, label: str, source: str, message: bytes) -> None:
        """Record that `user` says `message` is spam or ham (a Junk move, a quarantine release...)."""
        if label not in ("spam", "ham"):
            raise StorageError(f"training label must be spam or ham, not {label!r}")
        row = {
            "user": normalize_address(user) if user else "",
            "label": label,
            "source": source[:32],
            "message": bytes(message[:TRAINING_MESSAGE_MAX]),
            "created": time.time(),
        }
        await self._tx(lambda conn: conn.execute(insert(t.training_events).values(**row)))

    async def add_training_from_mailbox(
        self, account: str, mailbox: str, uids: Sequence[int], label: str, source: str
    ) -> int:
        """One training event per message `uids` of `account`'s `mailbox` (IMAP Junk moves); returns how many."""
        if label not in ("spam", "ham"):
            raise StorageError(f"training label must be spam or ham, not {label!r}")
        account = normalize_address(account)

        def work(conn: Connection) -> int:
            box = self._mailbox_row(conn, account, mailbox)
            wanted = sorted(set(uids))
            rows = []
            now = time.time()
            for i in range(0, len(wanted), 500):
                for r in conn.execute(
                    select(t.messages.c.blob).where(
                        t.messages.c.mailbox_id == box.id, t.messages.c.uid.in_(wanted[i : i + 500])
                    )
                ):
                    data = self._read_blob(conn, r.blob)[:TRAINING_MESSAGE_MAX]
                    rows.append({"user": account, "label": label, "source": source, "message": data, "created": now})
            if rows:
                conn.execute(insert(t.training_events), rows)
            return len(rows)

        return await self._tx(work)

    async def pending_training_events(self, limit: int) -> list[TrainingEvent]:
        """The oldest events not yet learned from."""
        c = t.training_events.c
        query = (
            select(c.id, c.user, c.label, c.source, c.message, c.created)
            .where(c.processed.is_(None))
            .order_by(c.id)
            .limit(limit)
        )
        return await self._read(lambda conn: [TrainingEvent(*r) for r in conn.execute(query)])

    async def finish_training_events(self, ids: Sequence[int], now: float, keep_seconds: float = 30 * 86400) -> None:
        """Mark events learned; processed events older than `keep_seconds` are deleted."""
        c = t.training_events.c

        def work(conn: Connection) -> None:
            for i in range(0, len(ids), 500):
                conn.execute(update(t.training_events).where(c.id.in_(ids[i : i + 500])).values(processed=now))
            conn.execute(delete(t.training_events).where(c.processed.is_not(None), c.processed < now - keep_seconds))

        await self._tx(work)

    async def training_event_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(user, label) -> (pending, processed), for `spam status` and tests."""
        c = t.training_events.c

        def work(conn: Connection) -> dict[tuple[str, str], tuple[int, int]]:
            out: dict[tuple[str, str], tuple[int, int]] = {}
            pending = func.sum(case((c.processed.is_(None), 1), else_=0))
            for user, label, p, n in conn.execute(
                select(c.user, c.label, pending, func.count()).group_by(c.user, c.label)
            ):
                out[(user, label)] = (int(p or 0), int(n) - int(p or 0))
            return out

        return await self._read(work)

    async def spam_user_weights(self, user: str) -> dict[int, float]:
        """A user's spam model delta (user "" is the site's): bucket -> weight."""
        c = t.spam_weights.c
        user = normalize_address(user) if user else ""
        return await self._read(
            lambda conn: {r[0]: r[1] for r in conn.execute(select(c.bucket, c.weight).where(c.user == user))}
        )

    async def spam_set_weights(self, user: str, weights: dict[int, float]) -> None:
        """Replace these buckets of a user's delta (a weight of 0 deletes the row)."""
        c = t.spam_weights.c
        user = normalize_address(user) if user else ""
        buckets = sorted(weights)

        def work(conn: Connection) -> None:
            for i in range(0, len(buckets), 500):
                chunk = buckets[i : i + 500]
                conn.execute(delete(t.spam_weights).where(c.user == user, c.bucket.in_(chunk)))
                rows = [{"user": user, "bucket": b, "weight": weights[b]} for b in chunk if weights[b]]
                if rows:
                    conn.execute(insert(t.spam_weights), rows)

        await self._tx(work)


class TrainingEvent(NamedTuple):
    id: int
    user: str
    label: str  # "spam" or "ham"
    source: str
    message: bytes
    created: float


TRAINING_MESSAGE_MAX = 256 * 1024  # of a message kept for training (the classifier reads no more)


class GuardBan(NamedTuple):
    """A row of guard_bans."""

    network: str
    until: float
    level: int
    reason: str
    events: int
    created: float
    active: bool

    @property
    def duration(self) -> int:
        return round(self.until - self.created)


def _guard_ban(r: Any) -> GuardBan:
    return GuardBan(r.network, r.until, r.level, r.reason, r.events, r.created, bool(r.active))
