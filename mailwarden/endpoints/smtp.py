"""SMTP listeners: MX (25), submission (587, STARTTLS) and submissions (465, implicit TLS).

aiosmtpd does the command dispatch, MAIL/RCPT parameter parsing, AUTH
exchanges and the STARTTLS transport swap. We subclass it where its
defaults are not safe enough for an internet-facing MTA:

* the command loop (`_handle_client`): strict CRLF, bounded lines, no echo of
  client bytes, an error budget;
* DATA: our sans-I/O framer (protocol/smtp_data.py) instead of aiosmtpd's,
  which accepts bare LF line endings (the SMTP smuggling class);
* AUTH PLAIN/LOGIN: verified asynchronously with bounded argon2 (aiosmtpd's
  authenticator is synchronous and would block the loop);
* EHLO: the capabilities we actually honour, AUTH only once TLS is up;
* every reply passes `render_reply` (enhanced status codes, no control bytes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, _AuthMechAttr

from mailwarden.checks.milter import MilterSpec
from mailwarden.checks.result import Action, CheckResult
from mailwarden.config import Config
from mailwarden.dns.resolver import Resolver
from mailwarden.logs import log_event
from mailwarden.metrics import Metrics
from mailwarden.outbound.arc_seal import SealError, seal
from mailwarden.outbound.compromise import CompromiseGuard, HoldDecision, hold_alert
from mailwarden.outbound.dkim_keys import rsa_key
from mailwarden.outbound.limits import LimitTable, SendLimits, check_content
from mailwarden.outbound.quotas import Quotas, alert_message
from mailwarden.outbound.signing import is_trusted_client, sign_accepted
from mailwarden.pipeline.content import ContentStage, outbound_hold_reason
from mailwarden.pipeline.filing import Filer
from mailwarden.pipeline.headers import received_header, return_path
from mailwarden.pipeline.inbound import (
    InboundEnvelope,
    InboundPolicy,
    Verdict,
    evaluate_message,
    evaluate_reputation,
    inbound_content_stage,
    local_user_names,
    merge,
)
from mailwarden.pipeline.local_mail import deliver_local
from mailwarden.pipeline.mailbox_quota import DataDecision, data_check, declared_size, dsn_message, rcpt_check
from mailwarden.pipeline.milters import MilterChain, MilterContext
from mailwarden.pipeline.recipients import check_recipient
from mailwarden.pipeline.reports import dmarc_record
from mailwarden.pipeline.submission import (
    check_from_header,
    check_sender,
    ensure_message_id,
    split_header_block,
)
from mailwarden.protocol.smtp_data import BodyChunk, DataError, DataFramer, EndOfData, LineError, check_command_line
from mailwarden.protocol.smtp_reply import SmtpReply, clean_text, render_reply
from mailwarden.security.app_passwords import check_credentials
from mailwarden.security.guard import Decision, Guard, banned_decision
from mailwarden.security.passwords import PasswordHashing
from mailwarden.security.tls import ServerTls
from mailwarden.storage.interfaces import Accounts, DmarcStore, Resolution
from mailwarden.storage.quota import parse_size
from mailwarden.storage.spool import Spool, SpoolRecord, SpoolWriteError, new_queue_id

log = logging.getLogger("mailwarden.smtp")

ROLES = ("mx", "submission", "submissions")
# A dot-atom reverse/forward path, or the null path <>; anything else goes to the full parser.
_SIMPLE_PATH = re.compile(
    r"^<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)@"
    r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)?>(?:[ \t]+(.*))?$"
)


@dataclass
class SmtpServices:
    """What a listener needs; built once by the server, shared by sessions."""

    config: Config
    accounts: Accounts
    hashing: PasswordHashing
    spool: Spool
    filer: Filer
    metrics: Metrics
    tls: ServerTls
    inbound: InboundChecks | None = None  # None: inbound.checks is off
    reports: DmarcStore | None = None
    limits: LimitTable | None = None  # None: the global values from config
    quotas: Quotas | None = None  # None: no sending quotas
    guard: CompromiseGuard | None = None  # None: no compromised-account hold
    conn_guard: Guard | None = None  # None: no connection guard (security/guard.py)
    milters: tuple[MilterSpec, ...] = ()  # content filters (milter.milters), in order


@dataclass
class InboundChecks:
    """The data-stage checks for mail from unauthenticated, untrusted MX clients."""

    resolver: Resolver
    policy: InboundPolicy
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    content: ContentStage | None = None  # the content checks, shared with outbound mail
    protected_names: tuple[str, ...] = ()  # content.protected_names (display names outside mail must not use)

    def __post_init__(self) -> None:
        if self.content is None:
            self.content = inbound_content_stage(self.policy, self.resolver)

    def applies_to(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return True
        return not any(addr in net for net in self.trusted)


_LOCAL_NAMES: dict[str, tuple[Any, frozenset[str]]] = {}  # the last directory snapshot and its names


class _Hooks:
    """aiosmtpd handler hooks for MAIL and RCPT; the server is the session."""

    async def handle_MAIL(
        self, server: SmtpSession, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        return await server.on_mail(address, options)

    async def handle_RCPT(
        self, server: SmtpSession, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        return await server.on_rcpt(address)


_HOOKS = _Hooks()


@functools.cache
def _class_tables(cls: type) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(SMTP verb, method name) and (AUTH mechanism, method name) pairs of a session class."""
    names = [n for n in dir(cls) if callable(getattr(cls, n, None))]
    smtp = tuple((n[5:], n) for n in names if n.startswith("smtp_"))
    auth = tuple((n[5:].replace("__", "-"), n) for n in names if n.startswith("auth_") and n[5:] in ("PLAIN", "LOGIN"))
    return smtp, auth


class SmtpSession(SMTP):
    """One SMTP connection. `role` is "mx", "submission" or "submissions"."""

    def __init__(self, services: SmtpServices, role: str, loop: asyncio.AbstractEventLoop) -> None:
        cfg = services.config
        self.services = services
        self.role = role
        self.cfg_max_size: int = cfg.get("smtp.max_message_size")
        self.cfg_max_cmd: int = cfg.get("smtp.max_command_line")
        self.cfg_max_errors: int = cfg.get("smtp.max_errors")
        self.cfg_data_line: int = cfg.get("smtp.max_data_line")
        self.cfg_data_timeout: float = cfg.get("smtp.data_timeout")
        self.cfg_delim: str = cfg.get("smtp.recipient_delimiter")
        self.cfg_default_quota = parse_size(cfg.get("accounts.default_quota"))
        # aiosmtpd's own __init__ introspects the class with inspect.getmembers
        # on every connection (~6% of CPU under load); we set the same state
        # from tables built once per class (_class_tables).
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=max(self.cfg_max_cmd, 1024)),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.__ident__ = "Mailwarden ESMTP"
        self.loop = loop
        self.event_handler = _HOOKS
        self.data_size_limit = self.cfg_max_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = cfg.get("server.hostname")
        self.tls_context = services.tls.context
        self.require_starttls = False
        self._timeout_duration = cfg.get("smtp.command_timeout")
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = role != "mx"
        self._ehlo_hook_ver = None
        self._enforce_call_limit = False
        smtp_names, auth_names = _class_tables(type(self))
        self._smtp_methods = {verb: getattr(self, name) for verb, name in smtp_names}
        self._auth_methods = {mech: _AuthMechAttr(getattr(self, name), True) for mech, name in auth_names}
        self._handle_hooks = {"MAIL": _HOOKS.handle_MAIL, "RCPT": _HOOKS.handle_RCPT}
        self.sid = f"{random.getrandbits(40):010x}"
        self.ip = "?"
        self._untrusted_client: bool | None = None  # not in inbound.trusted_networks; known at the first ask
        self.errors = 0
        self.messages = 0
        self.user: str | None = None
        self.owned: set[str] = set()
        self.resolutions: list[Resolution] = []
        self.ip_reputation: CheckResult | None = None  # the client IP's block list result, once per session
        self.early_results: list[CheckResult] | None = None  # block list results of this transaction
        self._dmarc_report: dict[str, Any] | None = None  # this message's DMARC data, if its domain wants reports
        self._quarantine: dict[str, str] | None = None  # this message's verdict is quarantine (pipeline/quarantine.py)
        self._closing = False
        self._admitted = False  # the connection guard counted this connection (release it at the end)
        self._flagged = False  # already counted as an event (early talker): not a silent scanner too
        self.commands = 0
        self._meter = services.conn_guard.command_meter() if services.conn_guard is not None else None
        self._milters: MilterChain | None = None  # this transaction's content filters (pipeline/milters.py)
        self._milter_qid: str | None = None  # the queue id the filters were told (macro i)

    # ---- connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            # STARTTLS finished: aiosmtpd dropped any plaintext pipelined
            # behind STARTTLS (RFC 3207 §4.2) and started a fresh session.
            log_event("starttls", sid=self.sid, ip=self.ip, tls=self._tls_summary())
            self.user = None
            return
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.ip = str(peer[0])
        if transport.get_extra_info("ssl_object") is not None:
            # Implicit TLS (465): mark TLS as active so AUTH is offered and
            # STARTTLS is not. aiosmtpd only knows about STARTTLS.
            self._tls_protocol = transport  # type: ignore[assignment]
            self.session.ssl = transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        self.services.metrics.connections.labels(self.role).inc()
        log_event("connect", sid=self.sid, proto="smtp", listener=self.role, ip=self.ip)

    def connection_lost(self, error: Exception | None) -> None:
        self._end_milters()
        log_event("disconnect", sid=self.sid, ip=self.ip, messages=self.messages, errors=self.errors)
        if self.services.conn_guard is not None:
            silent = self.commands == 0 and not self._flagged
            self.services.conn_guard.connection_closed(self.role, self.ip, self._admitted, silent)
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        if self.transport is not None:
            self.transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        log_event("timeout", sid=self.sid, ip=self.ip)
        super()._timeout_cb()

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None

    def _ssl_object(self) -> Any:
        return self.transport.get_extra_info("ssl_object") if self.transport else None

    def _tls_summary(self) -> str | None:
        ssl_obj = self._ssl_object()
        if ssl_obj is None:
            return None
        return f"{ssl_obj.version()}:{ssl_obj.cipher()[0]}"

    # ---- output ----------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        line = render_reply(text)
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(line.encode("utf-8", "replace") + b"\r\n")
        await self._writer.drain()
        if line.startswith("5"):
            self.errors += 1
            if line.startswith("50") and self.services.conn_guard is not None:  # 500-504: syntax or sequence
                await self._guard_event("protocol")
            if self.errors >= self.cfg_max_errors and not self._closing:
                await self._close_with("421 4.7.0 Too many errors, closing connection", "too_many_errors")

    async def _close_with(self, status: str, reason: str) -> None:
        self._closing = True
        log_event("close", sid=self.sid, ip=self.ip, reason=reason)
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(render_reply(status).encode() + b"\r\n")
            try:
                await self._writer.drain()
            except ConnectionError:
                pass
            self.transport.close()

    def _reject(self, reason: str) -> None:
        self.services.metrics.rejected.labels(self.role, reason).inc()

    # ---- the command loop -------------------------------------------------

    async def _handle_client(self) -> None:
        guard = self.services.conn_guard
        if guard is not None and not await self._guard_admits(guard):
            return
        await self.push(f"220 {self.hostname} Mailwarden ESMTP")
        if guard is not None:
            # Until the first command (the shorter of the two); then smtp.command_timeout per command.
            self._reset_timeout(min(guard.idle_timeout, self._timeout_duration))
        reader = self._reader
        while self.transport is not None and not self._closing:
            try:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    await self._discard_long_line(exc.consumed)
                    self._reject("line_too_long")
                    await self.push("500 5.5.2 Line too long")
                    continue
                except asyncio.IncompleteReadError:
                    break  # client closed
                problem = check_command_line(line, self.cfg_max_cmd)
                if problem is LineError.TOO_LONG:
                    self._reject("line_too_long")
                    await self.push("500 5.5.2 Line too long")
                    continue
                if problem is LineError.BARE_NEWLINE:
                    self._reject("bare_newline")
                    await self.push("500 5.5.2 Command lines must end with CRLF; bare CR or LF refused")
                    continue
                self.commands += 1
                if self._meter is not None and not self._meter.tick():
                    await self._guard_event("protocol")
                    self._reject("command_rate")
                    await self._close_with("421 4.7.0 Too many commands, closing connection", "command_rate")
                    break
                await self._dispatch(line[:-2])
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except (ConnectionError, OSError):
                break
            except Exception as exc:  # a bug must not kill the listener
                log_event("internal_error", logging.ERROR, sid=self.sid, error=repr(exc))
                log.debug("internal error", exc_info=True)
                await self._close_with("421 4.3.0 Internal error, closing connection", "internal_error")
        if self.transport is not None:
            self.transport.close()

    async def _guard_admits(self, guard: Guard) -> bool:
        """The connection guard's verdict, then (MX only) the pre-greeting wait for early talkers.

        The wait is one read with a timeout on the stream: no task polls. A client
        that sends anything before our greeting is not speaking SMTP (RFC 5321
        §3.1: the client waits for the 220), like the bots postscreen screens out.
        """
        decision: Decision = await guard.connection_opened(self.role, self.ip)
        if not decision.ok:
            self._flagged = True
            self._reject(decision.reason)
            await self._close_with(decision.line(), decision.reason)
            return False
        self._admitted = True
        if self.role != "mx" or guard.greet_delay <= 0:
            return True
        try:
            early = await asyncio.wait_for(self._reader.read(1), guard.greet_delay)
        except TimeoutError:
            return True
        self._flagged = True
        if early:
            self._reject("early_talker")
            await self._guard_event("early_talker", close_on_ban=False)  # counted first: closing cancels this task
            await self._close_with("554 5.7.1 Protocol error: talking before the greeting", "early_talker")
        elif self.transport is not None:
            self.transport.close()  # gone before the greeting: counted as a silent connection
            self._flagged = False
        return False

    async def _guard_event(
        self, event: str, account: str | None = None, fingerprint: bytes | None = None, close_on_ban: bool = True
    ) -> None:
        """Count a ban event for this client; when it bans the client, this session ends at once too."""
        guard = self.services.conn_guard
        if guard is None:
            return
        ban = await guard.record(event, self.ip, account=account, secret_fingerprint=fingerprint, listener=self.role)
        if ban is not None and close_on_ban and not self._closing:
            await self._close_with(banned_decision(ban).line(), "banned")

    async def _discard_long_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    async def _dispatch(self, line: bytes) -> None:
        if not line:
            await self.push("500 5.5.2 Empty command")
            return
        if b"\x00" in line:
            self._reject("nul_byte")
            await self.push("500 5.5.2 NUL byte in command refused")
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
            arg = arg_bytes.decode("utf-8").strip() or None
        except UnicodeDecodeError:
            self._reject("bad_utf8")
            await self.push("501 5.5.4 Command is not valid UTF-8")
            return
        method = self._smtp_methods.get(verb) if verb.isalpha() else None
        if method is None:
            await self.push("502 5.5.1 Command not recognized")
            return
        self._reset_timeout()
        try:
            await method(arg)
        except SmtpReply as reply:
            if reply.close:
                await self._close_with(reply.line(), "policy")
            else:
                await self.push(reply.line())

    # ---- commands we own ------------------------------------------------

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self.session.extended_smtp = True  # type: ignore[union-attr]
        self.session.host_name = hostname  # type: ignore[union-attr]
        caps = ["PIPELINING", f"SIZE {self.cfg_max_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if not self.tls_active:
            caps.append("STARTTLS")
        else:
            caps.append("AUTH PLAIN LOGIN")
        lines = [f"250-{self.hostname}"] + [f"250-{c}" for c in caps[:-1]] + [f"250 {caps[-1]}"]
        self._writer.write("".join(line + "\r\n" for line in lines).encode())
        await self._writer.drain()

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_active:
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push("214 2.0.0 See RFC 5321")

    async def smtp_VRFY(self, arg: str | None) -> None:
        # Never confirm or deny addresses to anonymous clients (harvesting).
        await self.push("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def _set_rset_state(self) -> None:
        super()._set_rset_state()
        self.resolutions = []
        self.early_results = None

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        self._end_milters()
        self.resolutions = []
        self.early_results = None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Plain <local@domain> addresses skip the (slow) stdlib header parser.
        simple = _SIMPLE_PATH.match(arg)
        if simple:
            return simple.group(1) or "<>", simple.group(2) or ""
        # The stdlib header parser can raise IndexError and friends on hostile input.
        try:
            return super()._getaddr(arg)
        except Exception:
            return None, None

    # ---- MAIL / RCPT policy (called from aiosmtpd through _Hooks) ----------

    async def on_mail(self, address: str, options: list[str]) -> str:
        if self.messages >= self._limits().max_messages_per_session:
            self._reject("too_many_messages")
            raise SmtpReply(421, "4.7.0", "Too many messages in this session", close=True)
        sender = "" if address == "<>" else address
        if self.session.authenticated:  # type: ignore[union-attr]
            if not self.owned:
                self.owned = await self.services.accounts.sender_addresses(self.user or "")
            try:
                check_sender(sender, self.owned)
            except SmtpReply as reply:
                self._reject("sender_not_owned")
                log_event("reject", sid=self.sid, ip=self.ip, user=self.user, reason="sender_not_owned", sender=sender)
                return reply.line()
            refusal = await self._quota_refusal(messages=1, recipients=0)
            if refusal is not None:
                return refusal
        refusal = await self._milter_mail(address, options)
        if refusal is not None:
            return refusal
        self.envelope.mail_from = address  # type: ignore[union-attr]
        self.envelope.mail_options.extend(options)  # type: ignore[union-attr]
        return "250 2.1.0 Sender OK"

    async def on_rcpt(self, address: str) -> str:
        env = self.envelope
        assert env is not None
        if len(env.rcpt_tos) >= self._limits().max_recipients:
            self._reject("too_many_recipients")
            return "452 4.5.3 Too many recipients"
        try:
            res = await check_recipient(
                self.services.accounts,
                address,
                bool(self.session.authenticated),
                self.cfg_delim,  # type: ignore[union-attr]
            )
        except SmtpReply as reply:
            reason = {"5.1.1": "unknown_user", "5.7.1": "relay_denied"}.get(reply.enhanced, "bad_recipient")
            self._reject(reason)
            log_event("reject", sid=self.sid, ip=self.ip, reason=reason, rcpt=clean_text(address))
            if reason in ("unknown_user", "relay_denied"):
                await self._guard_event("unknown_user" if reason == "unknown_user" else "relay")
            return reply.line()
        refusal = await self._reputation_refusal()
        if refusal is None and self.session.authenticated:  # type: ignore[union-attr]
            refusal = await self._quota_refusal(messages=0, recipients=len(env.rcpt_tos) + 1)
        if refusal is None and res.local:  # storage quota (pipeline/mailbox_quota.py)
            try:
                size = declared_size(env.mail_options)
                await rcpt_check(self.services.accounts, address, res, size, self.cfg_default_quota, self.sid)
            except SmtpReply as reply:
                self._reject("quota_full")
                refusal = reply.line()

        if refusal is None and self._milters is not None:
            milter_refusal = await self._milters.rcpt(address, ())
            refusal = milter_refusal.line() if milter_refusal is not None else None
        if refusal is not None:
            return refusal
        env.rcpt_tos.append(address)
        self.resolutions.append(res)
        return "250 2.1.5 Recipient OK"

    def _limits(self) -> SendLimits:
        """The size and count limits for this session's sender (outbound/limits.py)."""
        if self.services.limits is None:
            self.services.limits = LimitTable.from_config(self.services.config)
        return self.services.limits.for_sender(self.user)  # set only by a successful AUTH

    async def _hold_reason(self, remote: list[str], message: bytes) -> str:
        """Why this user's outside mail must be held ("" to send): the account is on hold, this message
        puts it there, or the content stage (the same checks inbound mail gets) calls the message spam."""
        guard = self.services.guard
        assert self.user
        if guard is not None:
            reason = await guard.held(self.user)
            if reason:
                return reason
        content_reason = await self._outbound_content_reason(message)
        if content_reason:
            return content_reason
        decision = await guard.after_accept(self.user, remote) if guard is not None else None
        if decision is None:
            return ""
        self.services.metrics.accounts_held.labels(decision.signal).inc()
        log_event(
            "account_held", logging.WARNING, sid=self.sid, ip=self.ip, user=self.user, signal=decision.signal,
            reason=decision.reason,
        )  # fmt: skip
        user = self.user
        await self._alert_postmaster(lambda pm: hold_alert(user, decision, pm, self.hostname), "account_held")
        return decision.reason

    async def _outbound_content_reason(self, message: bytes) -> str:
        """Spam from an authenticated user is held with an alert, not sent (a compromised account, usually)."""
        inbound = self.services.inbound
        if inbound is None or inbound.content is None:
            return ""
        results = await inbound.content.run(message, "outbound", inbound.policy.disabled)
        why = outbound_hold_reason(results, inbound.policy.junk_score)
        if not why:
            return ""
        reason = f"outbound content: {why}"
        self.services.metrics.accounts_held.labels("outbound_content").inc()
        log_event("outbound_content_held", logging.WARNING, sid=self.sid, ip=self.ip, user=self.user, reason=reason)
        decision = HoldDecision("outbound_content", reason)
        user = self.user or ""
        await self._alert_postmaster(
            lambda pm: hold_alert(user, decision, pm, self.hostname, account=False), "outbound_content_held"
        )
        return reason

    async def _quota_refusal(self, *, messages: int, recipients: int) -> str | None:
        """451 4.7.1 when this user's or domain's sending quota would be exceeded; alerts the admin."""
        quotas = self.services.quotas
        if quotas is None or not self.user:
            return None
        exceeded = await quotas.check(self.user, messages, recipients)
        if exceeded is None:
            return None
        q = exceeded.limit
        self._reject("quota")
        self.services.metrics.quota_exceeded.labels(q.scope, q.window, q.unit).inc()
        log_event(
            "quota_exceeded", logging.WARNING, sid=self.sid, ip=self.ip, user=self.user, subject=exceeded.subject,
            scope=q.scope, window=q.window, unit=q.unit, limit=q.limit, used=exceeded.used,
        )  # fmt: skip
        if await quotas.first_alert(exceeded):
            await self._alert_postmaster(lambda pm: alert_message(exceeded, pm, self.hostname), "quota_exceeded")
        return exceeded.reply().line()

    async def _alert_postmaster(self, build: Callable[[str], bytes], reason: str) -> None:
        """Mail postmaster@<primary domain> an alert built for that address; a failure is logged, never raised
        (the decision it reports, a hold or a 451, stands either way)."""
        primary = self.services.config.get("server.primary_domain") or self.hostname
        postmaster = f"postmaster@{primary}"
        try:
            await deliver_local(self.services, postmaster, build(postmaster), reason)
        except Exception as exc:
            log_event("local_mail_failed", logging.ERROR, rcpt=postmaster, reason=reason, error=type(exc).__name__)

    def _checks_apply(self) -> InboundChecks | None:
        inbound = self.services.inbound
        if self.role != "mx" or self.session.authenticated or inbound is None:  # type: ignore[union-attr]
            return None
        if self._untrusted_client is None:  # the client's address is fixed: ask the network list once
            self._untrusted_client = inbound.applies_to(self.ip)
        return inbound if self._untrusted_client else None

    def _count_alerts(self, results: Iterable[CheckResult]) -> None:
        """Block list errors are the administrator's to fix: count them per zone for alerting."""
        for result in results:
            for error in result.details.get("errors", ()):
                self.services.metrics.check_alerts.labels(result.check, error.get("zone", "?")).inc()

    async def _reputation_refusal(self) -> str | None:
        """Block lists for the client IP (once per session) and the HELO and MAIL FROM
        domains (once per transaction), asked at the first RCPT like Postfix's
        reject_rbl_client, so the log line has the sender and recipient. A listing
        whose zone says reject is refused here, naming the zone; others count later."""
        inbound = self._checks_apply()
        if inbound is None:
            return None
        if self.early_results is None:
            env = self.envelope
            sender = "" if env is None or env.mail_from == "<>" else (env.mail_from or "")
            self.early_results = await evaluate_reputation(
                self.ip,
                self.session.host_name or "",  # type: ignore[union-attr]
                sender,
                inbound.policy,
                inbound.resolver,
                self.ip_reputation,
            )
            if self.early_results:
                self.ip_reputation = self.early_results[0]
            self._count_alerts(self.early_results)
        for result in self.early_results:
            if result.action is Action.REJECT:
                self._reject("dnsbl")
                log_event("reject", sid=self.sid, ip=self.ip, reason="dnsbl", detail=result.reason)
                return f"554 5.7.1 Service unavailable; {clean_text(result.reason, 300)}"
        return None

    # ---- DATA --------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        env = self.envelope
        assert env is not None
        if not env.mail_from:
            await self.push("503 5.5.1 Need MAIL command")
            return
        if not env.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self.cfg_data_timeout)
        max_size = self._limits().max_message_bytes
        framer = DataFramer(max_size, self.cfg_data_line)
        buf = bytearray()
        end: EndOfData | None = None
        while end is None:
            chunk = await self._reader.read(65536)
            if not chunk:
                log_event("data_aborted", sid=self.sid, ip=self.ip, received=framer.size)
                if self.transport is not None:
                    self.transport.close()
                return  # nothing was acknowledged, nothing is kept
            for event in framer.feed(chunk):
                if isinstance(event, BodyChunk):
                    buf += event.data
                else:
                    end = event
        if end.leftover:
            # Commands pipelined after the terminator go back to the command reader.
            self._reader._buffer[0:0] = end.leftover  # type: ignore[attr-defined]
        self._reset_timeout()
        if end.error is not None:
            await self._refuse_data(end.error, max_size)
            return
        try:
            reply = await self._accept(bytes(buf))
        except SmtpReply as refused:
            reply = refused.line()
        self._set_post_data_state()
        await self.push(reply)

    async def _refuse_data(self, error: DataError, max_size: int) -> None:
        self._reject(error.value)
        log_event("reject", sid=self.sid, ip=self.ip, reason=error.value)
        self._set_post_data_state()
        if error is DataError.BARE_NEWLINE:
            # The client's framing disagrees with ours; nothing after this can be trusted.
            await self.push("550 5.5.2 Message refused: bare CR or LF in DATA; lines must end with CRLF")
            await self._close_with("421 4.7.0 Closing connection after framing error", "bare_newline")
        elif error is DataError.TOO_BIG:
            await self.push(f"552 5.3.4 Message exceeds the size limit of {max_size} bytes")
        else:
            await self.push(f"554 5.6.0 Message has a line longer than {self.cfg_data_line} bytes")

    async def _accept(self, message: bytes) -> str:
        """Run the data stage, make the message durable, return the 250 reply."""
        env = self.envelope
        assert env is not None
        sender = "" if env.mail_from == "<>" else (env.mail_from or "")
        try:
            check_content(message, self._limits())
        except SmtpReply as reply:
            self._reject("content_limit")
            log_event("reject", sid=self.sid, ip=self.ip, user=self.user, reason="content_limit", detail=reply.text)
            raise
        milter_results: list[CheckResult] = []
        if self._milters is not None:
            message, milter_results = await self._milter_message(message)
            if not env.rcpt_tos:
                log_event(
                    "milter_no_recipients", sid=self.sid, ip=self.ip, detail="the filters removed every recipient"
                )
                return "250 2.0.0 Ok: no recipients left after content filtering"
            sender = "" if env.mail_from == "<>" else (env.mail_from or "")
        header_block, _ = split_header_block(message)
        prefix = b""
        if self.session.authenticated:  # type: ignore[union-attr]
            try:
                check_from_header(header_block, self.owned)
            except SmtpReply as reply:
                self._reject("from_header")
                log_event("reject", sid=self.sid, ip=self.ip, user=self.user, reason="from_header", detail=reply.text)
                raise
            prefix += ensure_message_id(header_block, self.hostname)
        mailbox = "INBOX"
        inbound = self._checks_apply()
        milter_hold = ""
        if inbound is not None:
            self.early_results = [*(self.early_results or ()), *milter_results]
            message, mailbox = await self._run_checks(inbound, message, sender)
        elif milter_results:
            mailbox, milter_hold = self._milter_verdict(milter_results)
        qid = self._milter_qid or new_queue_id()
        local: dict[str, str] = {}
        remote: list[str] = []
        remote_domain = ""  # the hosted domain that forwards (an alias to an outside address)
        for rcpt, res in zip(env.rcpt_tos, self.resolutions, strict=True):
            for account in res.local:
                local.setdefault(account, rcpt)
            for target in res.remote:
                if target not in remote:
                    remote.append(target)
                remote_domain = remote_domain or rcpt.rpartition("@")[2].strip("<>").lower()
        ssl_obj = self._ssl_object()
        tls = (ssl_obj.version(), ssl_obj.cipher()[0], ssl_obj.cipher()[2]) if ssl_obj else None
        protocol = "ESMTP" + ("S" if tls else "") + ("A" if self.session.authenticated else "")  # type: ignore[union-attr]
        received = received_header(
            helo=self.session.host_name or "",  # type: ignore[union-attr]
            ip=self.ip,
            hostname=self.hostname,
            protocol=protocol,
            queue_id=qid,
            tls=tls,
            recipient=env.rcpt_tos[0] if len(env.rcpt_tos) == 1 else None,
        )
        data = received + prefix + message
        ours = is_trusted_client(self.ip, self.services.config.get("inbound.trusted_networks"))
        if self.session.authenticated or ours:  # type: ignore[union-attr]
            accounts = self.services.accounts
            data = await sign_accepted(prefix + message, header_block, sender, accounts.active_signing_keys, qid) + data
        arc_set = await self._seal_forward(data, remote_domain) if remote_domain and inbound is not None else b""
        quota = await self._quota_at_data(local, remote, sender, len(return_path(sender)) + len(data))
        local = quota.local
        envelope = {
            "sender": sender,
            "local": [[rcpt, account, mailbox] for account, rcpt in local.items()],
            "remote": remote,
            "ip": self.ip,
            "user": self.user,
            "listener": self.role,
            "time": time.time(),
        }
        if arc_set:
            envelope["arc"] = arc_set.decode("latin-1")  # prepended to the forwarded copies only (filing.py)
        if milter_hold and remote:
            envelope["hold"] = milter_hold
        elif remote and self.user:
            hold = await self._hold_reason(remote, message)
            if hold:
                envelope["hold"] = hold  # queued as "held": never sent until released
        if self._dmarc_report is not None:
            envelope["dmarc"] = self._dmarc_report
            self._dmarc_report = None
        if self._quarantine is not None:
            envelope["quarantine"] = self._quarantine  # filed into the quarantine table, in no mailbox
            self._quarantine = None
        try:
            await self.services.spool.append(qid, envelope, data)
        except SpoolWriteError as exc:
            log_event("spool_error", logging.ERROR, sid=self.sid, error=str(exc))
            self._reject("spool_error")
            raise SmtpReply(451, "4.3.0", "Temporary storage failure, try again later") from None
        self.services.filer.submit(SpoolRecord(qid, envelope, data))
        if quota.bounced:
            await self._quota_dsn(quota, qid, sender, data)
        self.messages += 1
        if self.session.authenticated and self.services.quotas is not None and self.user:  # type: ignore[union-attr]
            try:
                await self.services.quotas.count(self.user, len(env.rcpt_tos))
            except Exception as exc:  # the message is safe; a lost count must not fail it
                log_event("quota_count_failed", logging.ERROR, sid=self.sid, qid=qid, error=type(exc).__name__)
        self.services.metrics.accepted.labels(self.role).inc()
        log_event(
            "accepted",
            sid=self.sid,
            qid=qid,
            ip=self.ip,
            user=self.user,
            sender=clean_text(sender),
            rcpts=len(env.rcpt_tos),
            size=len(data),
        )
        return f"250 2.0.0 Ok: queued as {qid}"

    async def _quota_at_data(self, local: dict[str, str], remote: list[str], sender: str, size: int) -> DataDecision:
        """The storage quota recheck with the stored size (pipeline/mailbox_quota.py); 452 if nobody has room."""
        try:
            return await data_check(
                self.services.accounts, local, remote, sender, size, self.cfg_default_quota, self.cfg_delim, self.sid
            )
        except SmtpReply:
            self._reject("quota_full")
            raise

    async def _quota_dsn(self, quota: DataDecision, qid: str, sender: str, data: bytes) -> None:
        """Spool the DSN for recipients whose mailbox was full; a failure is logged (the message itself is safe)."""
        primary = self.services.config.get("server.primary_domain") or self.hostname
        envelope, dsn = dsn_message(quota, qid, sender, data, self.hostname, primary)
        dsn_qid = new_queue_id()
        try:
            await self.services.spool.append(dsn_qid, envelope, dsn)
        except SpoolWriteError as exc:
            log_event("quota_dsn_failed", logging.ERROR, sid=self.sid, qid=qid, error=str(exc))
            return
        self.services.filer.submit(SpoolRecord(dsn_qid, envelope, dsn))
        log_event("quota_dsn", sid=self.sid, qid=qid, dsn_qid=dsn_qid, rcpts=len(quota.bounced))

    async def _seal_forward(self, data: bytes, domain: str) -> bytes:
        """The ARC set for mail this MX forwards (RFC 8617), signed with the forwarding domain's RSA key.

        A message that cannot be sealed is still forwarded, without a new set:
        the seal helps the next hop, and its absence is what every forward
        without ARC looks like.
        """
        key = rsa_key(self.services.accounts.active_signing_keys(domain))
        if key is None:
            log_event("arc_seal_skipped", sid=self.sid, domain=domain, reason="no signing key for the domain")
            return b""
        authserv_id = self._checks_apply().policy.authserv_id  # type: ignore[union-attr]
        try:
            sealed = await asyncio.to_thread(seal, data, key, authserv_id)
        except SealError as exc:
            log_event("arc_seal_skipped", sid=self.sid, domain=domain, reason=str(exc))
            return b""
        log_event("arc_sealed", sid=self.sid, domain=domain, selector=key.selector)
        return sealed

    async def _run_checks(self, inbound: InboundChecks, message: bytes, sender: str) -> tuple[bytes, str]:
        """The data-stage verdict: refuse (raises SmtpReply), or the checked message and its folder."""
        env = self.envelope
        assert env is not None
        policy = dataclasses.replace(
            inbound.policy,
            local_domains=frozenset(await self.services.accounts.list_domains()),
            local_names=await self._local_names(inbound),
        )
        verdict, checked = await evaluate_message(
            message,
            InboundEnvelope(
                self.ip,
                self.session.host_name or "",  # type: ignore[union-attr]
                sender,
                tuple(env.rcpt_tos),
                tuple(dict.fromkeys(a for res in self.resolutions for a in res.local)),
            ),
            inbound.resolver,
            policy,
            self.early_results or (),
            inbound.content,
        )
        log_event(
            "verdict",
            sid=self.sid,
            ip=self.ip,
            sender=clean_text(sender),
            action=verdict.action.value,
            score=f"{verdict.score:g}",
            checks=" ".join(f"{r.check}={r.result}" for r in verdict.results),
            reasons="; ".join(verdict.reasons) or None,
            ms=round(verdict.elapsed * 1000, 1),
        )
        self._count_alerts(r for r in verdict.results if r.check == "uribl")
        report = next((r.details for r in verdict.results if r.check == "dmarc" and r.details.get("rua")), None)
        reply = verdict.smtp_reply()
        if reply is not None:
            self._reject(f"verdict_{verdict.action.value}")
            if report is not None and self.services.reports is not None:
                # A refused message never reaches the spool; its report row is written now.
                await self.services.reports.record_dmarc(
                    [dmarc_record(f"refused-{new_queue_id()}", time.time(), self.ip, report)]
                )
            raise reply
        self._dmarc_report = report  # filed with the message, for aggregate reports
        if verdict.stripped:
            log_event("attachment_stripped", sid=self.sid, ip=self.ip, names=clean_text(", ".join(verdict.stripped)))
        if verdict.action is Action.QUARANTINE:
            self._hold_in_quarantine(verdict, sender=clean_text(sender))
            return checked, "INBOX"
        folder = "Junk" if verdict.action is Action.JUNK else "INBOX"
        return checked, folder

    async def _local_names(self, inbound: InboundChecks) -> frozenset[str]:
        """Our users' names for the display-name rule, rebuilt only when the directory changes."""
        accounts = self.services.accounts
        directory = accounts.directory() if hasattr(accounts, "directory") else None
        if directory is None:
            return inbound.policy.local_names
        cached = _LOCAL_NAMES.get("names")
        if cached is None or cached[0] is not directory:
            names = local_user_names(directory.accounts, inbound.protected_names)
            cached = _LOCAL_NAMES["names"] = (directory, names)
        return cached[1]

    # ---- milters (pipeline/milters.py) -------------------------------------

    async def _milter_mail(self, address: str, options: list[str]) -> str | None:
        """Open this transaction's filters (connect, HELO and MAIL steps); their refusal refuses MAIL."""
        self._end_milters()
        direction = "outbound" if self.session.authenticated else "inbound"  # type: ignore[union-attr]
        specs = [s for s in self.services.milters if s.applies(direction)]
        if not specs:
            return None
        ssl_obj = self._ssl_object()
        sock = self.transport.get_extra_info("sockname") if self.transport is not None else None
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        self._milter_qid = new_queue_id()
        ctx = MilterContext(
            hostname=self.hostname,
            listener=self.role,
            ip=self.ip,
            port=int(peer[1]) if peer else 0,
            helo=self.session.host_name or "",  # type: ignore[union-attr]
            queue_id=self._milter_qid,
            daemon_addr=str(sock[0]) if sock else "",
            auth_user=self.user,
            tls=(ssl_obj.version(), ssl_obj.cipher()[0], ssl_obj.cipher()[2]) if ssl_obj else None,
        )
        self._milters = MilterChain(specs, ctx, self._limits().max_message_bytes, self.sid)
        refusal = await self._milters.mail(address, options)
        if refusal is None:
            return None
        self._end_milters()
        self._reject("milter")
        log_event("reject", sid=self.sid, ip=self.ip, reason="milter", stage="mail", detail=refusal.text)
        return refusal.line()

    async def _milter_message(self, message: bytes) -> tuple[bytes, list[CheckResult]]:
        """The filters' data steps; applies their envelope changes and returns the changed message."""
        chain = self._milters
        env = self.envelope
        assert chain is not None and env is not None
        try:
            outcome = await chain.message(message)
        except SmtpReply:
            self._reject("milter")
            raise
        for gone in outcome.del_rcpts:
            for i in reversed(range(len(env.rcpt_tos))):
                if env.rcpt_tos[i].strip("<>").lower() == gone.lower():
                    del env.rcpt_tos[i]
                    del self.resolutions[i]
        for added in outcome.add_rcpts:
            try:
                res = await check_recipient(self.services.accounts, added, True, self.cfg_delim)
            except SmtpReply as exc:
                log_event("milter_rcpt_not_added", sid=self.sid, rcpt=clean_text(added), detail=exc.text)
                continue
            env.rcpt_tos.append(added)
            self.resolutions.append(res)
        if outcome.sender is not None:
            env.mail_from = outcome.sender or "<>"
        log_event(
            "milters", sid=self.sid, ip=self.ip,
            results=" ".join(f"{r.check}={r.result}" for r in outcome.results),
        )  # fmt: skip
        return outcome.message, outcome.results

    def _milter_verdict(self, results: list[CheckResult]) -> tuple[str, str]:
        """For mail the inbound checks skip: the filters' own verdict (folder, hold reason); raises a refusal."""
        verdict = merge(results, InboundPolicy(authserv_id=self.hostname))
        reply = verdict.smtp_reply()
        if reply is not None:
            self._reject(f"verdict_{verdict.action.value}")
            log_event("reject", sid=self.sid, ip=self.ip, reason="milter", detail=reply.text)
            raise reply
        authenticated = self.session.authenticated  # type: ignore[union-attr]
        if verdict.action is Action.QUARANTINE and not authenticated:  # trusted-network mail: the quarantine store
            self._hold_in_quarantine(verdict, reason="milter")
            return "INBOX", ""
        if verdict.action in (Action.JUNK, Action.QUARANTINE):
            why = "content filter: " + "; ".join(verdict.reasons)
            # Outbound: held, never sent (pipeline/content.py's rule); local copies go to Junk.
            return "Junk", why if self.session.authenticated else ""  # type: ignore[union-attr]
        return "INBOX", ""

    def _hold_in_quarantine(self, verdict: Verdict, **log: str) -> None:
        """This message goes to the quarantine store, in no mailbox (filed from the spool record; pipeline/quarantine.py)."""
        self._quarantine = {
            "reason": "; ".join(verdict.reasons[:3]) or "quarantine",
            "verdict": json.dumps(verdict.as_dict())[:16000],
        }
        log_event("quarantined", sid=self.sid, ip=self.ip, **log)

    def _end_milters(self) -> None:
        chain, self._milters = self._milters, None
        self._milter_qid = None
        if chain is not None:
            chain.close()

    # ---- AUTH --------------------------------------------------------------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = bytes(blob).split(b"\x00")  # type: ignore[arg-type]
        if len(parts) != 3:
            await self.push("501 5.5.2 Malformed PLAIN response")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            return await self._auth_outcome(login, None)
        return await self._auth_outcome(login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._auth_outcome(login, password)  # type: ignore[arg-type]

    async def _auth_outcome(self, login_b: bytes, password_b: bytes | None) -> AuthResult:
        """Verify; a failure returns handled=False so aiosmtpd sends 535 5.7.8."""
        services = self.services
        login, check = await check_credentials(
            services.hashing, services.accounts, services.config, login_b, password_b
        )
        if not check.ok:
            self._reject("auth_failed")
            log_event(
                "auth_fail",
                logging.WARNING,
                sid=self.sid,
                proto="smtp",
                ip=self.ip,
                user=clean_text(login),
                reason=check.reason,
            )
            guard = self.services.conn_guard
            if guard is not None:
                # Only a keyed hash of the password is kept, so the same stale password counts once per window.
                fingerprint = guard.fingerprint(password_b) if password_b is not None else None
                await self._guard_event("auth_fail", clean_text(login), fingerprint)
                if not self._closing:
                    await guard.throttle(clean_text(login))
            return AuthResult(success=False, handled=False)
        self.user = login
        self.owned = set()
        self.data_size_limit = self._limits().max_message_bytes  # aiosmtpd checks MAIL ... SIZE= against it
        log_event("auth_ok", sid=self.sid, proto="smtp", ip=self.ip, user=login)
        if self.services.guard is not None and await self.services.guard.login(login, self.ip):
            log_event("login_new_ip", sid=self.sid, proto="smtp", ip=self.ip, user=login)
        return AuthResult(success=True, handled=False, auth_data=login)
