"""IMAP listeners: 143 (STARTTLS) and 993 (implicit TLS), one `ImapSession` per connection.

The session owns the socket and the state (not authenticated, authenticated,
selected); framing and parsing are the sans-I/O `CommandParser`
(protocol/imap), every response goes through its formatter. Handlers raise
`ImapError` (or `StorageError`) to refuse something; `_dispatch` is the one
place those become tagged NO/BAD responses with their response codes.

Security: LOGIN and AUTHENTICATE PLAIN only over TLS (`NO [PRIVACYREQUIRED]`
before, and LOGINDISABLED in CAPABILITY); plaintext pipelined behind STARTTLS
is dropped (the buffered bytes and the parser's state); the connection guard
(security/guard.py) admits or refuses each connection (`* BYE`), counts failed
logins (`event=auth_fail proto=imap ...`), throttles them and meters commands;
literals are bounded by the parser, lower before authentication.

Concurrency: a session keeps a snapshot of the selected mailbox (UIDs and
flags) and compares it with the store after commands, sending EXISTS,
EXPUNGE and FETCH FLAGS for what other sessions or deliveries changed.
IDLE waits on the process's `MailboxHub` (poked when the filer files mail or a
session changes a mailbox), with a periodic recheck (`IDLE_RECHECK` seconds) for
changes made by other worker processes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import email.errors
import email.header
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailwarden.config import Config
from mailwarden.logs import log_event
from mailwarden.metrics import Metrics
from mailwarden.pipeline.junk_training import record_transfer
from mailwarden.protocol.imap import formatter as fmt
from mailwarden.protocol.imap.commands import (
    Bad,
    Command,
    ContinuationLine,
    FetchAtt,
    IdleDone,
    NeedContinuation,
    SearchKey,
    Section,
    SequenceSet,
)
from mailwarden.protocol.imap.formatter import Atom, Raw
from mailwarden.protocol.imap.mailbox import MailboxNameError, decode_mailbox_name
from mailwarden.protocol.imap.message import (
    body_structure,
    envelope_of,
    header_value,
    parse,
    section_bytes,
    split_header,
)
from mailwarden.protocol.imap.parser import CommandParser
from mailwarden.protocol.smtp_reply import clean_text
from mailwarden.security.app_passwords import check_credentials
from mailwarden.security.guard import Guard, banned_decision
from mailwarden.security.passwords import PasswordHashing
from mailwarden.security.tls import ServerTls
from mailwarden.storage.interfaces import SPECIAL_MAILBOXES, MailboxInfo, MessageInfo, StorageError
from mailwarden.storage.quota import QuotaExceeded, parse_size

log = logging.getLogger("mailwarden.imap")

IMAP_ROLES = ("imap", "imaps")
DELIMITER = "/"
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_BY_UPPER = {f.upper(): f for f in SYSTEM_FLAGS}
PREAUTH_LITERAL = 8192  # the largest literal before authentication
PREAUTH_TIMEOUT = 60.0
AUTH_TIMEOUT = 30 * 60.0  # RFC 3501 §5.4: at least 30 minutes
IDLE_RECHECK = 5.0  # seconds between IDLE rechecks of the store (changes made by other processes)
MAX_ERRORS = 20  # BAD responses before the connection is closed
READ_HIGH_WATER = 256 * 1024
FETCH_BATCH_BYTES = 4 * 1024 * 1024  # bodies a FETCH reads from the store in one call (one trip, bounded memory)
SPECIAL_NAMES = frozenset(name for name, _ in SPECIAL_MAILBOXES)


class ImapError(Exception):
    """A refusal: rendered as `tag NO|BAD [code] text` by `ImapSession._dispatch`."""

    def __init__(self, text: str, code: str | None = None, status: str = "NO") -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.status = status


def bad(text: str, code: str | None = None) -> ImapError:
    return ImapError(text, code, "BAD")


class MailboxHub:
    """In-process change notification: `changed()` wakes every session waiting in `wait()`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def changed(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass


@dataclass
class ImapServices:
    config: Config
    store: Any  # SqlStore: the IMAP methods are SqlStore's (storage/sql.py)
    hashing: PasswordHashing
    tls: ServerTls
    metrics: Metrics
    hub: MailboxHub
    guard: Guard | None = None
    max_message: int = 50 * 1024 * 1024
    sessions: set[ImapSession] = field(default_factory=set)  # open connections, closed at shutdown

    def close_all(self) -> None:
        """Shutdown: tell every client (`* BYE`, RFC 3501 §7.1.5) and end its session."""
        for session in list(self.sessions):
            session.shutdown()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the sessions ended by `close_all`, so none is left pending when the loop stops."""
        tasks = [s._task for s in list(self.sessions) if s._task is not None and not s._task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


@dataclass
class Selected:
    box: MailboxInfo
    read_only: bool
    uids: list[int] = field(default_factory=list)
    msgs: dict[int, MessageInfo] = field(default_factory=dict)  # current rows, by UID
    flags: dict[int, tuple[str, ...]] = field(default_factory=dict)  # what this session last told the client
    uidnext: int = 1

    def seq_of(self, uid: int) -> int:
        import bisect

        return bisect.bisect_left(self.uids, uid) + 1


def compress_uids(uids: Sequence[int]) -> str:
    """1,2,3,5 -> "1:3,5" (for COPYUID)."""
    out: list[str] = []
    start = prev = None
    for u in uids:
        if start is None:
            start = prev = u
        elif u == prev + 1:  # type: ignore[operator]
            prev = u
        else:
            out.append(f"{start}" if start == prev else f"{start}:{prev}")
            start = prev = u
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}:{prev}")
    return ",".join(out)


def _mailbox_name(raw: bytes) -> str:
    try:
        name = decode_mailbox_name(raw)
    except MailboxNameError as exc:
        raise bad(f"invalid mailbox name: {exc}") from None
    name = name.strip(DELIMITER)
    if not name:
        raise ImapError("invalid mailbox name", "CANNOT")
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX" + DELIMITER):
        return "INBOX" + name[5:]
    if any(not seg for seg in name.split(DELIMITER)) or any(ord(c) < 0x20 for c in name):
        raise ImapError("invalid mailbox name", "CANNOT")
    return name


def _list_match(pattern: str, name: str) -> bool:
    """LIST wildcards: `*` matches anything, `%` anything but the delimiter."""
    import re

    rx = "".join(".*" if c == "*" else f"[^{DELIMITER}]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.DOTALL) is not None


def _missing_parents(listed: Iterable[str], existing: set[str]) -> list[str]:
    """Every superior name of `listed` that is not itself an existing mailbox."""
    out: set[str] = set()
    for name in listed:
        parts = name.split(DELIMITER)
        for i in range(1, len(parts)):
            parent = DELIMITER.join(parts[:i])
            if parent not in existing:
                out.add(parent)
    return sorted(out)


def _flag(f: str) -> str:
    return _SYSTEM_BY_UPPER.get(f.upper(), f)


class ImapSession(asyncio.Protocol):
    """One IMAP connection."""

    def __init__(self, services: ImapServices, role: str) -> None:
        self.services = services
        self.role = role
        self.sid = f"{random.getrandbits(40):010x}"
        self.ip = "?"
        self.transport: asyncio.Transport | None = None
        self.tls = False
        self.user: str | None = None
        self.selected: Selected | None = None
        self.parser = CommandParser(max_literal=PREAUTH_LITERAL, max_command=4 * PREAUTH_LITERAL)
        self._inbox: list[bytes] = []
        self._inbox_size = 0
        self._data = asyncio.Event()
        self._eof = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._paused = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._admitted = False
        self._commands = 0
        self._errors = 0
        self._idle_tag: str | None = None
        self._sasl_tag: str | None = None
        self._starttls = False
        self._meter = services.guard.command_meter() if services.guard is not None else None

    # ---- transport --------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # the TLS transport after STARTTLS
            self.transport = transport  # type: ignore[assignment]
            return
        self.transport = transport  # type: ignore[assignment]
        self.services.sessions.add(self)
        self.ip = str((transport.get_extra_info("peername") or ("?", 0))[0])
        self.tls = transport.get_extra_info("ssl_object") is not None
        log_event("connect", sid=self.sid, proto="imap", listener=self.role, ip=self.ip)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"imap-{self.sid}")

    def data_received(self, data: bytes) -> None:
        if self._starttls:
            return  # plaintext behind STARTTLS: dropped (RFC 3501 §6.2.1)
        self._inbox.append(data)
        self._inbox_size += len(data)
        self._data.set()
        if self._inbox_size > READ_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._data.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.services.sessions.discard(self)
        self._eof = True
        self._closing = True
        self._data.set()
        self._can_write.set()
        log_event("disconnect", sid=self.sid, ip=self.ip, commands=self._commands)
        if self.services.guard is not None:
            self.services.guard.connection_closed(self.role, self.ip, self._admitted, self._commands == 0)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        await self._can_write.wait()

    def shutdown(self) -> None:
        """Server shutdown: `* BYE`, close the connection (TLS close_notify is not waited for), end the task."""
        self._closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(fmt.untagged_status("BYE", "Server shutting down"))
            transport.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _close(self, text: str | None = None) -> None:
        self._closing = True
        if text is not None:
            await self.write(fmt.untagged_status("BYE", text))
        if self.transport is not None:
            self.transport.close()

    async def _next_data(self, timeout: float) -> bytes | None:
        """Buffered bytes, b"" on a wake-up while idling, None at EOF or timeout."""
        deadline = time.monotonic() + timeout
        while not self._inbox:
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._data.clear()
            if self._idle_tag is not None:
                waiter = asyncio.ensure_future(self._data.wait())
                hub = asyncio.ensure_future(self.services.hub.wait(min(remaining, IDLE_RECHECK)))
                _done, pending = await asyncio.wait({waiter, hub}, return_when=asyncio.FIRST_COMPLETED)
                for p in pending:
                    p.cancel()
                if not self._inbox and not self._eof:
                    return b""
                continue
            try:
                await asyncio.wait_for(self._data.wait(), remaining)
            except TimeoutError:
                return None
        data = b"".join(self._inbox)
        self._inbox.clear()
        self._inbox_size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    # ---- the loop -----------------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            guard = self.services.guard
            if guard is not None:
                decision = await guard.connection_opened(self.role, self.ip)
                if not decision.ok:
                    log_event("close", sid=self.sid, ip=self.ip, reason=decision.reason)
                    await self._close(decision.text)
                    return
                self._admitted = True
            await self.write(fmt.untagged_status("OK", "Mailwarden IMAP4rev1 ready", "CAPABILITY " + self._caps()))
            while not self._closing:
                timeout = AUTH_TIMEOUT if self.user else PREAUTH_TIMEOUT
                if guard is not None and not self.user:
                    timeout = min(timeout, guard.idle_timeout)
                data = await self._next_data(timeout)
                if data is None:
                    if not self._eof:
                        log_event("timeout", sid=self.sid, ip=self.ip)
                        await self._close("Autologout; idle for too long")
                    break
                if data == b"":
                    await self._idle_update()
                    continue
                for event in self.parser.feed(data):
                    if self._closing:
                        break
                    await self._event(event)
                    if self._starttls:
                        break
                if self._starttls:
                    await self._upgrade()
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError):
            pass
        except Exception as exc:  # a bug must not kill the listener
            log_event("internal_error", logging.ERROR, sid=self.sid, proto="imap", error=repr(exc))
            log.debug("internal error", exc_info=True)
            await self._close("Internal error")
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    async def _upgrade(self) -> None:
        """STARTTLS: drop whatever was pipelined, forget the parser's state, then the handshake."""
        self._inbox.clear()
        self._inbox_size = 0
        self.parser.reset()
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            new = await loop.start_tls(
                self.transport, self, self.services.tls.context, server_side=True, ssl_handshake_timeout=30
            )
        except (ConnectionError, OSError, TimeoutError) as exc:
            log_event("starttls_failed", sid=self.sid, ip=self.ip, error=type(exc).__name__)
            self._closing = True
            if self.transport is not None:
                self.transport.close()
            return
        if new is None:
            self._closing = True
            return
        self.transport = new
        self.tls = True
        self._starttls = False
        ssl_obj = new.get_extra_info("ssl_object")
        log_event(
            "starttls", sid=self.sid, ip=self.ip, tls=f"{ssl_obj.version()}:{ssl_obj.cipher()[0]}" if ssl_obj else None
        )

    async def _event(self, event: Any) -> None:
        if isinstance(event, NeedContinuation):
            await self.write(fmt.continuation("Ready"))
            return
        if isinstance(event, Bad):
            await self.write(event.response())
            await self._count_error()
            if event.close:
                await self._close("Stream can no longer be framed")
            return
        if isinstance(event, IdleDone):
            if self._idle_tag is not None:
                tag, self._idle_tag = self._idle_tag, None
                await self._idle_update()
                await self.write(fmt.tagged(tag, "OK", "IDLE terminated"))
            return
        if isinstance(event, ContinuationLine):
            if self._sasl_tag is not None:
                tag, self._sasl_tag = self._sasl_tag, None
                self.parser.end_authenticate()
                await self._dispatch(tag, self._sasl_response(event.data))
            return
        if isinstance(event, Command):
            self._commands += 1
            if self._meter is not None and not self._meter.tick():
                await self._guard_event("protocol")
                await self._close("Too many commands")
                return
            await self._dispatch(event.tag, self._command(event))

    async def _dispatch(self, tag: str, work: Any) -> None:
        """Run a handler; the one place refusals become tagged responses."""
        try:
            text = await work
        except ImapError as exc:
            await self.write(fmt.tagged(tag, exc.status, exc.text, exc.code))
            if exc.status == "BAD":
                await self._count_error()
            return
        except QuotaExceeded as exc:  # RFC 9208 §4.3: nothing was stored
            log_event(
                "quota_full", sid=self.sid, proto="imap", user=self.user, size=exc.extra,
                used=exc.state.used, limit=exc.limit,
            )  # fmt: skip
            await self.write(
                fmt.tagged(tag, "NO", "Quota exceeded: not enough room for this in the mailbox", "OVERQUOTA")
            )
            return
        except StorageError as exc:
            await self.write(fmt.tagged(tag, "NO", str(exc)))
            return
        if text is None:  # the handler answered itself (IDLE, AUTHENTICATE continuation, LOGOUT)
            return
        code = None
        if isinstance(text, tuple):
            code, text = text
        await self.write(fmt.tagged(tag, "OK", text, code))

    async def _count_error(self) -> None:
        self._errors += 1
        await self._guard_event("protocol")
        if self._errors >= MAX_ERRORS and not self._closing:
            await self._close("Too many errors")

    async def _guard_event(self, event: str, account: str | None = None, fingerprint: bytes | None = None) -> bool:
        """Count a ban event; True (and the session closed) when it banned this client."""
        guard = self.services.guard
        if guard is None:
            return False
        ban = await guard.record(event, self.ip, account=account, secret_fingerprint=fingerprint, listener=self.role)
        if ban is not None and not self._closing:
            log_event("close", sid=self.sid, ip=self.ip, reason="banned")
            await self._close(banned_decision(ban).text)
            return True
        return False

    # ---- state --------------------------------------------------------------------------------------------------------

    _ANY = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})
    _NOT_AUTH = frozenset({"STARTTLS", "LOGIN", "AUTHENTICATE"})
    _SELECTED = frozenset({"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE"})

    def _caps(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS", "MOVE"]
        caps += ["UNSELECT", "SPECIAL-USE", "CHILDREN", "QUOTA", "QUOTA=RES-STORAGE"]
        if not self.user:
            if not self.tls:
                caps += ["STARTTLS", "LOGINDISABLED"]
            else:
                caps.append("AUTH=PLAIN")
        return " ".join(caps)

    async def _command(self, cmd: Command) -> Any:
        name = cmd.name
        if name in self._NOT_AUTH:
            if self.user:
                raise bad("already authenticated")
        elif name not in self._ANY:
            if not self.user:
                raise bad("log in first")
            if name in self._SELECTED and self.selected is None:
                raise bad("no mailbox selected")
        handler = getattr(self, "cmd_" + name, None)
        if handler is None:
            raise bad(f"{name} is not supported")
        return await handler(cmd)

    # ---- any state ----------------------------------------------------------------------------------------------------

    async def cmd_CAPABILITY(self, cmd: Command) -> str:
        await self.write(b"* CAPABILITY " + self._caps().encode() + b"\r\n")
        return "CAPABILITY completed"

    async def cmd_NOOP(self, cmd: Command) -> str:
        await self._sync(expunge=True)
        return "NOOP completed"

    async def cmd_CHECK(self, cmd: Command) -> str:
        await self._sync(expunge=True)
        return "CHECK completed"

    async def cmd_LOGOUT(self, cmd: Command) -> None:
        await self.write(fmt.untagged_status("BYE", "Mailwarden logging out"))
        await self.write(fmt.tagged(cmd.tag, "OK", "LOGOUT completed"))
        await self._close()
        return None

    async def cmd_ID(self, cmd: Command) -> str:
        await self.write(fmt.untagged(Atom("ID"), ["name", "Mailwarden"]))
        return "ID completed"

    async def cmd_ENABLE(self, cmd: Command) -> str:
        await self.write(b"* ENABLED\r\n")  # nothing we could enable yet; unknown ones are ignored (RFC 5161)
        return "ENABLE completed"

    # ---- not authenticated --------------------------------------------------------------------------------------------

    async def cmd_STARTTLS(self, cmd: Command) -> Any:
        if self.tls:
            raise bad("TLS is already active")
        await self.write(fmt.tagged(cmd.tag, "OK", "Begin TLS negotiation now"))
        self._starttls = True
        return None

    async def cmd_LOGIN(self, cmd: Command) -> Any:
        if not self.tls:
            raise ImapError("LOGIN is only allowed over TLS; use STARTTLS", "PRIVACYREQUIRED")
        user, password = cmd.args
        return await self._authenticate(user, password)

    async def cmd_AUTHENTICATE(self, cmd: Command) -> Any:
        mechanism, initial = cmd.args
        if mechanism != "PLAIN":
            self.parser.end_authenticate()
            raise ImapError(f"mechanism {mechanism[:20]} is not supported", "CANNOT")
        if not self.tls:
            self.parser.end_authenticate()
            raise ImapError("authentication is only allowed over TLS; use STARTTLS", "PRIVACYREQUIRED")
        if initial is None:
            self._sasl_tag = cmd.tag
            await self.write(b"+ \r\n")
            return None
        self.parser.end_authenticate()
        return await self._sasl_response(initial)

    async def _sasl_response(self, data: bytes) -> Any:
        if data.strip() == b"*":
            raise bad("authentication cancelled")
        try:
            blob = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad("invalid base64") from None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            raise bad("malformed PLAIN response")
        authzid, login, password = parts
        if authzid and authzid != login:
            return await self._authenticate(login, None)
        return await self._authenticate(login, password)

    async def _authenticate(self, login_b: bytes, password_b: bytes | None) -> Any:
        services = self.services
        login, check = await check_credentials(services.hashing, services.store, services.config, login_b, password_b)
        if not check.ok:
            user = clean_text(login)
            log_event(
                "auth_fail", logging.WARNING, sid=self.sid, proto="imap", ip=self.ip, user=user, reason=check.reason
            )
            guard = self.services.guard
            if guard is not None:
                fingerprint = guard.fingerprint(password_b) if password_b is not None else None
                if await self._guard_event("auth_fail", user, fingerprint):
                    return None
                await guard.throttle(user)
            raise ImapError("invalid credentials", "AUTHENTICATIONFAILED")
        self.user = login
        self.parser.max_literal = self.services.max_message
        self.parser.max_command = 2 * self.services.max_message
        log_event("auth_ok", sid=self.sid, proto="imap", ip=self.ip, user=login)
        return ("CAPABILITY " + self._caps(), "Logged in")

    # ---- mailboxes ----------------------------------------------------------------------------------------------------

    async def _box(self, name: str) -> MailboxInfo:
        box = await self.services.store.imap_mailbox(self.user, name)
        if box is None:
            raise ImapError(f"no mailbox {name}", "NONEXISTENT")
        return box

    async def cmd_SELECT(self, cmd: Command, read_only: bool = False) -> Any:
        self.selected = None
        name = _mailbox_name(cmd.args[0])
        box = await self._box(name)
        sel = Selected(box, read_only)
        self.selected = sel
        await self._sync(expunge=True, announce=False)
        w = self.write
        await w(b"* FLAGS " + fmt.flag_list(SYSTEM_FLAGS) + b"\r\n")
        perm = "()" if read_only else "(" + " ".join(SYSTEM_FLAGS) + " \\*)"
        await w(fmt.untagged_status("OK", "Flags permitted", f"PERMANENTFLAGS {perm}"))
        await w(b"* %d EXISTS\r\n* 0 RECENT\r\n" % len(sel.uids))
        unseen = next((i + 1 for i, u in enumerate(sel.uids) if "\\Seen" not in sel.flags[u]), None)
        if unseen is not None:
            await w(fmt.untagged_status("OK", "First unseen", f"UNSEEN {unseen}"))
        await w(fmt.untagged_status("OK", "UIDs valid", f"UIDVALIDITY {sel.box.uidvalidity}"))
        await w(fmt.untagged_status("OK", "Predicted next UID", f"UIDNEXT {sel.uidnext}"))
        return ("READ-ONLY" if read_only else "READ-WRITE", f"{cmd.name} completed")

    async def cmd_EXAMINE(self, cmd: Command) -> Any:
        return await self.cmd_SELECT(cmd, read_only=True)

    async def cmd_CREATE(self, cmd: Command) -> str:
        name = _mailbox_name(cmd.args[0])
        if name == "INBOX":
            raise ImapError("INBOX always exists", "ALREADYEXISTS")
        if await self.services.store.imap_mailbox(self.user, name) is not None:
            raise ImapError("mailbox exists", "ALREADYEXISTS")
        await self.services.store.imap_create_mailbox(self.user, name)
        return "CREATE completed"

    def _protected(self, name: str) -> None:
        if name in SPECIAL_NAMES:
            raise ImapError(f"{name} is needed for delivery and cannot be deleted or renamed", "CANNOT")

    async def cmd_DELETE(self, cmd: Command) -> str:
        name = _mailbox_name(cmd.args[0])
        self._protected(name)
        await self._box(name)
        if self.selected is not None and self.selected.box.name == name:
            self.selected = None
        await self.services.store.imap_delete_mailbox(self.user, name)
        self.services.hub.changed()
        return "DELETE completed"

    async def cmd_RENAME(self, cmd: Command) -> str:
        old, new = _mailbox_name(cmd.args[0]), _mailbox_name(cmd.args[1])
        if old == "INBOX":  # RFC 3501 §6.3.5: INBOX's messages move to the new mailbox; INBOX stays, empty
            if new == "INBOX" or await self.services.store.imap_mailbox(self.user, new) is not None:
                raise ImapError("target mailbox exists", "ALREADYEXISTS")
            await self.services.store.imap_rename_inbox(self.user, new)
            self.services.hub.changed()
            await self._sync(expunge=True)
            return "RENAME completed"
        self._protected(old)
        await self._box(old)
        if await self.services.store.imap_mailbox(self.user, new) is not None or new == "INBOX":
            raise ImapError("target mailbox exists", "ALREADYEXISTS")
        await self.services.store.imap_rename_mailbox(self.user, old, new, DELIMITER)
        return "RENAME completed"

    async def cmd_SUBSCRIBE(self, cmd: Command, on: bool = True) -> str:
        name = _mailbox_name(cmd.args[0])
        await self._box(name)
        await self.services.store.imap_subscribe(self.user, name, on)
        return f"{cmd.name} completed"

    async def cmd_UNSUBSCRIBE(self, cmd: Command) -> str:
        return await self.cmd_SUBSCRIBE(cmd, on=False)

    async def cmd_NAMESPACE(self, cmd: Command) -> str:
        await self.write(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        return "NAMESPACE completed"

    async def _list(self, reference: bytes, patterns: Iterable[bytes], lsub: bool, special_only: bool) -> None:
        boxes = await self.services.store.imap_mailboxes(self.user)
        names = {b.name for b, _ in boxes}
        word = b"LSUB" if lsub else b"LIST"
        for raw in patterns:
            try:
                ref = decode_mailbox_name(reference) if reference else ""
                pattern = decode_mailbox_name(raw) if raw else ""
            except MailboxNameError as exc:
                raise bad(f"invalid mailbox name: {exc}") from None
            if not pattern:
                await self.write(b'* %s (\\Noselect) "/" ""\r\n' % word)
                continue
            full = ref + pattern
            rows: list[tuple[str, list[str]]] = []
            for box, subscribed in boxes:
                if lsub and not subscribed:
                    continue
                if special_only and not box.special_use:
                    continue
                match_name = box.name
                if not _list_match(full, match_name) and not (
                    match_name == "INBOX" and _list_match(full.upper(), "INBOX")
                ):
                    continue
                attrs = []
                has_kids = any(n.startswith(box.name + DELIMITER) for n in names)
                attrs.append("\\HasChildren" if has_kids else "\\HasNoChildren")
                if box.special_use:
                    attrs.append(box.special_use)
                rows.append((box.name, attrs))
            if not special_only:
                # Levels of hierarchy that are not mailboxes themselves ("A" when only "A/B" exists) are listed
                # as \Noselect when the pattern matches them (RFC 3501 §6.3.8), so clients can walk the tree.
                listed = names if not lsub else {b.name for b, sub in boxes if sub}
                rows += [
                    (p, ["\\Noselect", "\\HasChildren"])
                    for p in _missing_parents(listed, names)
                    if _list_match(full, p)
                ]
                rows.sort(key=lambda row: (row[0] != "INBOX", row[0]))
            for name, attrs in rows:
                await self.write(b"* " + word + b" " + fmt.flag_list(attrs) + b' "/" ' + fmt.mailbox(name) + b"\r\n")

    async def cmd_LIST(self, cmd: Command) -> str:
        reference, patterns, select_opts, _returns = cmd.args
        await self._list(reference, patterns, lsub=False, special_only="SPECIAL-USE" in select_opts)
        return "LIST completed"

    async def cmd_LSUB(self, cmd: Command) -> str:
        reference, pattern = cmd.args
        await self._list(reference, [pattern], lsub=True, special_only=False)
        return "LSUB completed"

    async def cmd_STATUS(self, cmd: Command) -> str:
        name = _mailbox_name(cmd.args[0])
        box = await self._box(name)
        box, msgs = await self.services.store.imap_messages(box.id)
        if box is None:
            raise ImapError(f"no mailbox {name}", "NONEXISTENT")
        values: dict[str, int] = {
            "MESSAGES": len(msgs),
            "RECENT": 0,
            "UIDNEXT": box.uidnext,
            "UIDVALIDITY": box.uidvalidity,
            "UNSEEN": sum(1 for m in msgs if "\\Seen" not in m.flags),
            "SIZE": sum(m.size for m in msgs),
            "DELETED": sum(1 for m in msgs if "\\Deleted" in m.flags),
        }
        items: list[object] = []
        for item in cmd.args[1]:
            items += [Atom(item), values[item]]
        await self.write(b"* STATUS " + fmt.mailbox(name) + b" " + fmt.plist(items) + b"\r\n")
        return "STATUS completed"

    async def cmd_APPEND(self, cmd: Command) -> Any:
        raw_name, flags, when, message = cmd.args
        name = _mailbox_name(raw_name)
        if await self.services.store.imap_mailbox(self.user, name) is None:
            raise ImapError(f"no mailbox {name}", "TRYCREATE")
        if not message:
            raise bad("empty message")
        stamp = when.timestamp() if when is not None else time.time()
        clean = [_flag(f) for f in flags if f.upper() != "\\RECENT"]
        validity, uid = await self.services.store.imap_append(
            self.user, name, message, clean, stamp, self._default_quota()
        )
        self.services.hub.changed()
        await self._sync(expunge=True)
        return (f"APPENDUID {validity} {uid}", "APPEND completed")

    async def cmd_IDLE(self, cmd: Command) -> None:
        self._idle_tag = cmd.tag
        await self.write(fmt.continuation("idling"))
        await self._idle_update()
        return None

    async def _idle_update(self) -> None:
        await self._sync(expunge=True)

    async def cmd_GETQUOTAROOT(self, cmd: Command) -> str:
        name = _mailbox_name(cmd.args[0])
        await self._box(name)
        await self.write(b"* QUOTAROOT " + fmt.mailbox(name) + b' ""\r\n')
        await self._quota()
        return "GETQUOTAROOT completed"

    async def cmd_GETQUOTA(self, cmd: Command) -> str:
        if cmd.args[0] != b"":
            raise ImapError("no such quota root", "NONEXISTENT")
        await self._quota()
        return "GETQUOTA completed"

    def _default_quota(self) -> int:
        return parse_size(self.services.config.get("accounts.default_quota"))

    async def _quota(self) -> None:
        """`* QUOTA "" (STORAGE used limit)` in KiB, rounded up (RFC 9208 §5.1); no resource when unlimited."""
        state = (await self.services.store.quota_states([self.user])).get(self.user)
        if state is None:  # the account was deleted during the session
            raise StorageError(f"no such user {self.user}")
        limit = state.limit(self._default_quota())
        if not limit:
            await self.write(b'* QUOTA "" ()\r\n')
            return
        await self.write(b'* QUOTA "" (STORAGE %d %d)\r\n' % (-(-state.used // 1024), -(-limit // 1024)))

    # ---- selected -----------------------------------------------------------------------------------------------------

    async def _sync(self, expunge: bool, announce: bool = True) -> None:
        """Compare the selected mailbox with the store; tell the client what changed."""
        sel = self.selected
        if sel is None:
            return
        box, msgs = await self.services.store.imap_messages(sel.box.id)
        if box is None:  # deleted by another session
            self.selected = None
            await self.write(fmt.untagged_status("BYE", "Selected mailbox was deleted"))
            await self._close()
            return
        sel.box = box
        sel.uidnext = box.uidnext
        current = {m.uid: m for m in msgs}
        out: list[bytes] = []
        if expunge:
            for i in range(len(sel.uids) - 1, -1, -1):
                uid = sel.uids[i]
                if uid not in current:
                    out.append(b"* %d EXPUNGE\r\n" % (i + 1))
                    del sel.uids[i]
                    sel.flags.pop(uid, None)
        known = set(sel.uids)
        last = sel.uids[-1] if sel.uids else 0
        fresh = [m.uid for m in msgs if m.uid not in known and m.uid > last]
        for uid, m in current.items():
            if uid in known and sel.flags.get(uid) != m.flags:
                sel.flags[uid] = m.flags
                out.append(b"* %d FETCH (FLAGS %s)\r\n" % (sel.seq_of(uid), fmt.flag_list(m.flags)))
        sel.msgs = current
        if fresh:
            sel.uids.extend(fresh)
            for uid in fresh:
                sel.flags[uid] = current[uid].flags
            out.append(b"* %d EXISTS\r\n" % len(sel.uids))
        if announce and out:
            await self.write(b"".join(out))

    def _resolve(self, seq: SequenceSet, uid: bool) -> list[int]:
        """The UIDs a sequence set names, ascending (messages that vanished meanwhile are skipped)."""
        sel = self.selected
        assert sel is not None
        if uid:
            largest = sel.uids[-1] if sel.uids else 0
            out: set[int] = set()
            for lo, hi in seq.resolve(largest):
                if hi - lo < len(sel.uids):
                    out.update(u for u in range(lo, hi + 1) if u in sel.msgs)
                else:
                    out.update(u for u in sel.uids if lo <= u <= hi)
            return sorted(out & set(sel.uids))
        n = len(sel.uids)
        result: set[int] = set()
        for lo, hi in seq.resolve(n):
            if lo < 1 or hi > n:
                raise bad("invalid message sequence number")
            result.update(sel.uids[lo - 1 : hi])
        return sorted(result)

    async def cmd_CLOSE(self, cmd: Command) -> str:
        sel = self.selected
        assert sel is not None
        if not sel.read_only and await self.services.store.imap_expunge(sel.box.id):
            self.services.hub.changed()
        self.selected = None
        return "CLOSE completed"

    async def cmd_UNSELECT(self, cmd: Command) -> str:
        self.selected = None
        return "UNSELECT completed"

    async def cmd_EXPUNGE(self, cmd: Command) -> str:
        sel = self.selected
        assert sel is not None
        if sel.read_only:
            raise ImapError("mailbox is read-only", "READ-ONLY")
        await self._sync(expunge=True)
        uids = self._resolve(cmd.args[0], True) if cmd.uid else None
        if await self.services.store.imap_expunge(sel.box.id, uids):
            self.services.hub.changed()
        await self._sync(expunge=True)
        return "EXPUNGE completed"

    async def cmd_FETCH(self, cmd: Command) -> str:
        sel = self.selected
        assert sel is not None
        await self._sync(expunge=cmd.uid)
        seq, atts = cmd.args
        if cmd.uid and not any(a.name == "UID" for a in atts):
            atts = (FetchAtt("UID"), *atts)
        uids = self._resolve(seq, cmd.uid)
        sets_seen = not sel.read_only and any(
            (a.name == "BODY" and a.section is not None and not a.peek) or a.name in ("RFC822", "RFC822.TEXT")
            for a in atts
        )
        needs_body = any(a.name not in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE") for a in atts)
        if sets_seen:
            unseen = [u for u in uids if u in sel.msgs and "\\Seen" not in sel.msgs[u].flags]
            if unseen:
                changed = await self.services.store.imap_store_flags(sel.box.id, unseen, "+", ["\\Seen"])
                for u, flags in changed.items():
                    sel.msgs[u] = _with_flags(sel.msgs[u], flags)
                self.services.hub.changed()
        bodies: dict[int, bytes | None] = {}
        for u in uids:
            m = sel.msgs.get(u)
            if m is None:
                continue
            data = b""
            if needs_body:
                if u not in bodies:
                    bodies = await self._bodies(uids, u)
                data = bodies.pop(u)  # type: ignore[assignment]
                if data is None:
                    continue  # expunged meanwhile
            items: list[bytes] = []
            flags_sent = False
            for a in atts:
                items.append(self._fetch_item(a, m, data))
                flags_sent |= a.name == "FLAGS"
            if sets_seen and not flags_sent and sel.flags.get(u) != m.flags:
                items.append(b"FLAGS " + fmt.flag_list(m.flags))
                flags_sent = True
            if flags_sent:
                sel.flags[u] = m.flags
            await self.write(b"* %d FETCH (" % sel.seq_of(u) + b" ".join(items) + b")\r\n")
        return "FETCH completed"

    async def _bodies(self, uids: list[int], first: int) -> dict[int, bytes | None]:
        """Bodies of `uids` from `first` on, read in one store call: up to FETCH_BATCH_BYTES (at least one)."""
        sel = self.selected
        assert sel is not None
        batch: list[MessageInfo] = []
        size = 0
        for u in uids[uids.index(first) :]:
            m = sel.msgs.get(u)
            if m is None:
                continue
            if batch and size + m.size > FETCH_BATCH_BYTES:
                break
            batch.append(m)
            size += m.size
        data = await self.services.store.read_blobs([m.blob for m in batch])
        return {m.uid: d for m, d in zip(batch, data, strict=True)}

    def _fetch_item(self, a: FetchAtt, m: MessageInfo, data: bytes) -> bytes:
        name = a.name
        if name == "FLAGS":
            return b"FLAGS " + fmt.flag_list(m.flags)
        if name == "UID":
            return b"UID %d" % m.uid
        if name == "INTERNALDATE":
            when = datetime.datetime.fromtimestamp(m.internal_date, datetime.UTC)
            return b"INTERNALDATE " + fmt.date_time(when)
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % m.size
        if name == "ENVELOPE":
            return b"ENVELOPE " + bytes(envelope_of(split_header(data)[0]))
        if name in ("BODYSTRUCTURE", "BODY") and a.section is None:
            return name.encode() + b" " + body_structure(parse(data), extensible=name == "BODYSTRUCTURE")
        if name == "RFC822":
            return b"RFC822 " + fmt.literal(data)
        if name == "RFC822.HEADER":
            return b"RFC822.HEADER " + fmt.literal(split_header(data)[0])
        if name == "RFC822.TEXT":
            return b"RFC822.TEXT " + fmt.literal(split_header(data)[1])
        assert a.section is not None
        content = section_bytes(data, a.section) or b""
        label = b"BODY[" + _section_label(a.section) + b"]"
        if a.partial is not None:
            origin, length = a.partial
            content = content[origin : origin + length]
            label += b"<%d>" % origin
        return label + b" " + fmt.literal(content)

    async def cmd_STORE(self, cmd: Command) -> str:
        sel = self.selected
        assert sel is not None
        if sel.read_only:
            raise ImapError("mailbox is read-only", "READ-ONLY")
        await self._sync(expunge=cmd.uid)
        seq, action, flags = cmd.args
        clean = [_flag(f) for f in flags if f.upper() != "\\RECENT"]
        uids = self._resolve(seq, cmd.uid)
        if not uids:
            return "STORE completed"
        changed = await self.services.store.imap_store_flags(sel.box.id, uids, action.op, clean)
        self.services.hub.changed()
        for u in uids:
            if u not in changed:
                continue
            sel.msgs[u] = _with_flags(sel.msgs[u], changed[u])
            if action.silent:
                sel.flags[u] = changed[u]
                continue
            sel.flags[u] = changed[u]
            uid_part = b" UID %d" % u if cmd.uid else b""
            await self.write(b"* %d FETCH (FLAGS %s%s)\r\n" % (sel.seq_of(u), fmt.flag_list(changed[u]), uid_part))
        return "STORE completed"

    async def cmd_COPY(self, cmd: Command, move: bool = False) -> Any:
        sel = self.selected
        assert sel is not None
        if move and sel.read_only:
            raise ImapError("mailbox is read-only", "READ-ONLY")
        await self._sync(expunge=cmd.uid)
        seq, raw_dest = cmd.args
        dest = _mailbox_name(raw_dest)
        dest_box = await self.services.store.imap_mailbox(self.user, dest)
        if dest_box is None:
            raise ImapError(f"no mailbox {dest}", "TRYCREATE")
        uids = self._resolve(seq, cmd.uid)
        if not uids:
            return f"{cmd.name} completed"
        validity, src, dst = await self.services.store.imap_copy(
            sel.box.id, uids, self.user, dest, move, self._default_quota()
        )
        self.services.hub.changed()
        await record_transfer(self.services.store, self.user, sel.box, dest_box, dst, move)  # Junk: spam training
        code = f"COPYUID {validity} {compress_uids(src)} {compress_uids(dst)}" if src else None
        if move:
            if code:
                await self.write(fmt.untagged_status("OK", "Moved", code))
            await self._sync(expunge=True)
            return f"{cmd.name} completed"
        await self._sync(expunge=cmd.uid)
        return (code, "COPY completed") if code else "COPY completed"

    async def cmd_MOVE(self, cmd: Command) -> Any:
        return await self.cmd_COPY(cmd, move=True)

    async def cmd_SEARCH(self, cmd: Command) -> str:
        sel = self.selected
        assert sel is not None
        charset, key = cmd.args
        if charset not in (None, "UTF-8", "US-ASCII"):
            raise ImapError("only UTF-8 and US-ASCII are supported", "BADCHARSET (UTF-8 US-ASCII)")
        await self._sync(expunge=cmd.uid)
        hits: list[int] = []
        for seq, u in enumerate(sel.uids, 1):
            m = sel.msgs.get(u)
            if m is None:
                continue
            ctx = _SearchContext(self, sel, m, seq)
            if await ctx.match(key):
                hits.append(u if cmd.uid else seq)
        await self.write(b"* SEARCH" + b"".join(b" %d" % h for h in hits) + b"\r\n")
        return "SEARCH completed"


def _with_flags(m: MessageInfo, flags: tuple[str, ...]) -> MessageInfo:
    import dataclasses

    return dataclasses.replace(m, flags=flags)


def _section_label(s: Section) -> bytes:
    parts = [b".".join(b"%d" % n for n in s.part)] if s.part else []
    if s.text:
        text = s.text.encode()
        if s.fields:
            text += b" " + fmt.plist([Raw(fmt.astring(f)) for f in s.fields])
        parts.append(text)
    return b".".join(parts)


class _SearchContext:
    """Evaluates one SearchKey tree against one message; reads the body only when a key needs it."""

    def __init__(self, session: ImapSession, sel: Selected, m: MessageInfo, seq: int) -> None:
        self.session = session
        self.sel = sel
        self.m = m
        self.seq = seq
        self._data: bytes | None = None

    async def data(self) -> bytes:
        if self._data is None:
            try:
                self._data = await self.session.services.store.read_blob(self.m.blob)
            except (StorageError, OSError):
                self._data = b""
        return self._data

    async def header(self, name: str) -> str:
        raw = header_value(split_header(await self.data())[0], name)
        return "" if raw is None else decode_words(raw)

    async def match(self, key: SearchKey) -> bool:
        n, a, m = key.name, key.args, self.m
        flags = m.flags
        if n == "AND":
            for k in a:
                if not await self.match(k):
                    return False
            return True
        if n == "NOT":
            return not await self.match(a[0])
        if n == "OR":
            return await self.match(a[0]) or await self.match(a[1])
        if n == "ALL":
            return True
        simple = {
            "ANSWERED": "\\Answered",
            "DELETED": "\\Deleted",
            "DRAFT": "\\Draft",
            "FLAGGED": "\\Flagged",
            "SEEN": "\\Seen",
        }
        if n in simple:
            return simple[n] in flags
        if n.startswith("UN") and n[2:] in simple:
            return simple[n[2:]] not in flags
        if n in ("NEW", "RECENT"):
            return False
        if n == "OLD":
            return True
        if n == "KEYWORD":
            return _flag(a[0]) in flags
        if n == "UNKEYWORD":
            return _flag(a[0]) not in flags
        if n == "LARGER":
            return m.size > a[0]
        if n == "SMALLER":
            return m.size < a[0]
        if n in ("SET", "UID"):
            largest = (self.sel.uids[-1] if self.sel.uids else 0) if n == "UID" else len(self.sel.uids)
            target = m.uid if n == "UID" else self.seq
            return any(lo <= target <= hi for lo, hi in a[0].resolve(largest))
        if n in ("BEFORE", "ON", "SINCE"):
            day = datetime.datetime.fromtimestamp(m.internal_date, datetime.UTC).date()
            return _date_cmp(n, day, a[0])
        if n in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            try:
                sent = email_date(await self.header("Date"))
            except ValueError:
                return False
            return _date_cmp(n[4:], sent, a[0])
        needle = a[-1].decode("utf-8", "replace").lower() if isinstance(a[-1], bytes) else ""
        if n == "FROM":
            return needle in (m.from_ or await self.header("From")).lower()
        if n == "SUBJECT":
            return needle in (m.subject or await self.header("Subject")).lower()
        if n in ("TO", "CC", "BCC"):
            return needle in (await self.header(n.capitalize())).lower()
        if n == "HEADER":  # an empty string matches every message that has the field (RFC 3501 §6.4.4)
            raw = header_value(split_header(await self.data())[0], a[0])
            return raw is not None and needle in decode_words(raw).lower()
        if n in ("BODY", "TEXT"):
            data = await self.data()
            haystack = split_header(data)[1] if n == "BODY" else data
            return needle.encode("utf-8") in haystack.lower()
        raise bad(f"search key {n} is not supported")


def decode_words(raw: bytes) -> str:
    """A header value as text, RFC 2047 encoded words decoded, so SEARCH TO/CC/HEADER match what users read."""
    text = raw.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return text


def email_date(text: str) -> datetime.date:
    import email.utils

    parsed = email.utils.parsedate_to_datetime(text)
    if parsed is None:
        raise ValueError("no date")
    return parsed.date()


def _date_cmp(op: str, day: datetime.date, ref: datetime.date) -> bool:
    if op == "BEFORE":
        return day < ref
    if op == "ON":
        return day == ref
    return day >= ref


__all__ = ["IMAP_ROLES", "ImapError", "ImapServices", "ImapSession", "MailboxHub", "compress_uids"]
