"""Delivery by MX (RFC 5321 §5) with STARTTLS, MTA-STS and DANE: `MxTransport`.

One `send` delivers one message to the recipients of one domain and returns one
outcome per recipient; it never raises for a remote problem. In order:

1. The message must be CRLF only: one with a bare CR or LF is failed (5.6.0) and
   never sent, so we can never smuggle a second message through a lenient
   remote (the "SMTP smuggling" attacks). aiosmtplib dot-stuffs what we send.
2. MX lookup through our resolver: preference order, random among equals; no MX
   falls back to the domain's A/AAAA (RFC 5321 §5.1); a null MX (RFC 7505) fails
   at once with 5.1.10; a DNS failure defers (4.4.3).
3. Per MX host, the TLS policy (`tls_policy.py`): DANE when the MX and address
   answers and the TLSA answer are DNSSEC-secure (`dane.py`), else MTA-STS
   (`mta_sts.py`), else opportunistic STARTTLS. A host that cannot meet its
   policy is skipped and logged (`event=tls_policy`); nothing goes in clear.
4. Hosts are tried in order until one answers MAIL FROM. RCPT replies give the
   per-recipient outcomes: 2xx delivered (after DATA), 4xx deferred, 5xx failed.

Connections per MX host are bounded (`delivery.max_connections_per_host`, idle
ones included) and reused: after a transaction the connection waits up to
`delivery.idle_timeout` for the next message to that host, which starts with
RSET. Timeouts follow RFC 5321 §4.5.3.2: `delivery.connect_timeout` for the
connection and greeting, `delivery.command_timeout` per command,
`delivery.data_timeout` for the message and the reply to its final dot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib

from mailwarden.config import Config
from mailwarden.dns.resolver import DnsTempError, Resolver
from mailwarden.logs import log_event
from mailwarden.outbound import dane
from mailwarden.outbound.interfaces import RecipientOutcome, Status
from mailwarden.outbound.mta_sts import MtaSts, StsPolicy
from mailwarden.outbound.tls_policy import (
    DANE,
    ENCRYPT,
    OPPORTUNISTIC,
    TESTING,
    VERIFY,
    HostPolicy,
    TlsPolicyError,
    satisfies,
    unverified_context,
    verifying_context,
)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_MAX_REUSES = 100  # transactions per connection
_MAX_CONNECTION_AGE = 300.0  # seconds a connection is offered for reuse
_QUIT_TIMEOUT = 5.0
_ADDRESS_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>]")


def bare_line_ending(message: bytes) -> bool:
    """True if `message` has a CR or LF that is not part of a CRLF pair."""
    rest = message.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


def _enhanced(code: int, text: str) -> tuple[str, str]:
    """(enhanced status, the text without it); a default from the reply class when the remote gave none."""
    m = _ENHANCED.match(text)
    if m:
        return m.group(0), text[m.end() :].strip()
    return f"{str(code)[0]}.0.0", text


def _status(code: int) -> Status:
    return "failed" if code >= 500 else "deferred"


def _reply_text(response: Any) -> str:
    return " ".join(str(response.message).split("\n"))[:500]


class _HostFailure(Exception):
    """This host could not take the message (no connection, bad greeting, 4xx to MAIL, TLS policy): try the next."""

    def __init__(self, enhanced: str, text: str, code: int | None = None, policy: bool = False) -> None:
        super().__init__(text)
        self.enhanced = enhanced
        self.text = text
        self.code = code
        self.policy = policy


@dataclass
class _Conn:
    smtp: aiosmtplib.SMTP
    host: str
    ip: str
    achieved: str  # "none", "tls", "verified" or "dane"
    tls: str  # for RecipientOutcome.tls, e.g. "TLSv1.3 dane"
    born: float = field(default_factory=time.monotonic)
    uses: int = 0
    timer: asyncio.TimerHandle | None = None

    @property
    def remote(self) -> str:
        return f"{self.host}[{self.ip}]"


class _HostPool:
    """At most `limit` connections to one MX host, idle ones included; idle ones wait to be reused."""

    def __init__(self, limit: int, idle_timeout: float, closer: Callable[[_Conn], None]) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.closer = closer
        self.open = 0  # slots taken: connecting, busy or idle
        self.peak = 0  # the most slots ever taken at once (tests, metrics)
        self.idle: list[_Conn] = []
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, match: Callable[[_Conn], bool]) -> _Conn | None:
        """A matching idle connection, or None with a free slot for a new one; the caller owns one slot."""
        while True:
            now = time.monotonic()
            for conn in list(self.idle):
                if not conn.smtp.is_connected or now - conn.born > _MAX_CONNECTION_AGE:
                    self._drop_idle(conn)
            for conn in self.idle:
                if match(conn):
                    self._unpark(conn)
                    return conn
            if self.open < self.limit:
                self.open += 1
                self.peak = max(self.peak, self.open)
                return None
            if self.idle:  # full, but an idle connection of the wrong TLS level can make room
                victim = self.idle[0]
                self._unpark(victim)
                self.closer(victim)
                return None
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were woken but will not use the slot: pass it on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)

    def release(self, conn: _Conn | None, keep: bool) -> None:
        """Give back the caller's slot: park `conn` for reuse if `keep`, else close it and free the slot."""
        if conn is not None and keep and conn.smtp.is_connected and self.idle_timeout > 0:
            conn.timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, conn)
            self.idle.append(conn)
        else:
            if conn is not None:
                self.closer(conn)
            self.open -= 1
        self._wake()

    def close_idle(self) -> None:
        for conn in list(self.idle):
            self._drop_idle(conn)

    def _unpark(self, conn: _Conn) -> None:
        self.idle.remove(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _drop_idle(self, conn: _Conn) -> None:
        self._unpark(conn)
        self.closer(conn)
        self.open -= 1
        self._wake()

    def _expire(self, conn: _Conn) -> None:
        if conn in self.idle:
            self._drop_idle(conn)

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


@dataclass(frozen=True)
class _Route:
    hosts: list[str]
    secure: bool  # the MX answer (or its NODATA, for the implicit MX) carried the AD bit


class _NoRoute(Exception):
    def __init__(self, status: Status, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.enhanced = enhanced
        self.text = text


class MxTransport:
    """Delivers to the MX hosts of the recipient domain (the `Transport` the queue runner uses)."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        hostname: str,
        port: int = 25,
        max_connections_per_host: int = 4,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        idle_timeout: float = 5.0,
        verify_context: ssl.SSLContext | None = None,
        mta_sts_port: int = 443,
        mta_sts_timeout: float = 20.0,
    ) -> None:
        self.resolver = resolver
        self.hostname = hostname
        self.port = port
        self.max_connections_per_host = max_connections_per_host
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.idle_timeout = idle_timeout
        self._verify_ctx = verify_context or verifying_context()
        self._plain_ctx = unverified_context()
        self.mta_sts = MtaSts(resolver, self._verify_ctx, port=mta_sts_port, timeout=mta_sts_timeout)
        self.pools: dict[str, _HostPool] = {}
        self.connections_opened = 0  # TCP connections made (tests, metrics)
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Config, resolver: Resolver) -> MxTransport:
        ca_file = cfg.path("delivery.ca_file") if cfg.get("delivery.ca_file") else None
        return cls(
            resolver,
            hostname=cfg.get("server.hostname"),
            port=cfg.get("delivery.port"),
            max_connections_per_host=cfg.get("delivery.max_connections_per_host"),
            connect_timeout=cfg.get("delivery.connect_timeout"),
            command_timeout=cfg.get("delivery.command_timeout"),
            data_timeout=cfg.get("delivery.data_timeout"),
            idle_timeout=cfg.get("delivery.idle_timeout"),
            verify_context=verifying_context(ca_file),
            mta_sts_port=cfg.get("delivery.mta_sts_port"),
            mta_sts_timeout=cfg.get("delivery.mta_sts_timeout"),
        )

    async def close(self) -> None:
        """QUIT every idle connection and wait for the goodbyes (bounded by a short timeout)."""
        self._closed = True
        for pool in self.pools.values():
            pool.close_idle()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # ---- the one entry point ------------------------------------------------

    async def send(self, sender: str, recipients: Sequence[str], message: bytes, domain: str) -> list[RecipientOutcome]:
        recipients = list(recipients)
        domain = domain.lower().rstrip(".")
        outcomes = await self._send(sender, recipients, message, domain)
        for outcome in outcomes:
            log_event(
                "delivery",
                logging.INFO if outcome.status == "delivered" else logging.WARNING,
                domain=domain,
                mx=outcome.remote or "-",
                recipient=outcome.recipient,
                status=outcome.status,
                code=outcome.code,
                enhanced=outcome.enhanced,
                tls=outcome.tls or "none",
                reason=None if outcome.status == "delivered" else outcome.text,
            )
        return outcomes

    async def _send(self, sender: str, recipients: list[str], message: bytes, domain: str) -> list[RecipientOutcome]:
        if not recipients:
            return []
        if bare_line_ending(message):
            text = "message contains a bare CR or LF; refused, not sent (SMTP smuggling defence)"
            return [RecipientOutcome(r, "failed", None, "5.6.0", text) for r in recipients]
        if _ADDRESS_FORBIDDEN.search(sender):
            return [RecipientOutcome(r, "failed", None, "5.1.7", "invalid sender address") for r in recipients]
        final: dict[str, RecipientOutcome] = {}
        for r in recipients:
            if not r or _ADDRESS_FORBIDDEN.search(r) or "@" not in r:
                final[r] = RecipientOutcome(r, "failed", None, "5.1.3", "invalid recipient address")
        pending = [r for r in recipients if r not in final]
        if pending:
            data = message if message.endswith(b"\r\n") else message + b"\r\n"
            for outcome in await self._deliver(sender, pending, data, domain):
                final[outcome.recipient] = outcome
        return [final[r] for r in recipients]

    async def _deliver(self, sender: str, recipients: list[str], data: bytes, domain: str) -> list[RecipientOutcome]:
        try:
            route = await self._route(domain)
        except _NoRoute as exc:
            return [RecipientOutcome(r, exc.status, None, exc.enhanced, exc.text) for r in recipients]
        sts: StsPolicy | None = None
        sts_loaded = False
        last = _HostFailure("4.4.1", f"no MX host of {domain} could be reached")
        for host in route.hosts:
            try:
                ips, secure_addresses = await self._addresses(host)
                if not ips:
                    raise _HostFailure("4.4.4", f"MX host {host} has no address")
                policy: HostPolicy | None = None
                if route.secure and secure_addresses:
                    policy = await self._dane_policy(domain, host)
                if policy is None:
                    if not sts_loaded:
                        sts, sts_loaded = await self.mta_sts.policy(domain), True
                    policy = self._sts_policy(domain, host, sts)
                return await self._try_host(host, ips, policy, sender, recipients, data, domain)
            except _HostFailure as exc:
                last = exc
        status: Status = "failed" if last.code is not None and last.code >= 500 else "deferred"
        return [RecipientOutcome(r, status, last.code, last.enhanced, last.text) for r in recipients]

    # ---- DNS ------------------------------------------------------------------

    async def _route(self, domain: str) -> _Route:
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except DnsTempError as exc:
            raise _NoRoute("deferred", "4.4.3", f"MX lookup for {domain} failed: {exc.reason}") from None
        except ValueError:
            raise _NoRoute("failed", "5.1.2", f"{domain} is not a valid domain name") from None
        if answer.nxdomain:
            raise _NoRoute("failed", "5.1.2", f"domain {domain} does not exist")
        if not answer.records:
            return _Route([domain], answer.authenticated)  # implicit MX (RFC 5321 §5.1)
        named = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer.records]
        if all(name in ("", ".") for _, name in named):
            raise _NoRoute("failed", "5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
        by_preference: dict[int, list[str]] = {}
        for preference, name in named:
            if name not in ("", "."):
                by_preference.setdefault(preference, []).append(name)
        hosts: list[str] = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            random.shuffle(group)
            hosts.extend(h for h in group if h not in hosts)
        return _Route(hosts, answer.authenticated)

    async def _addresses(self, host: str) -> tuple[list[str], bool]:
        try:
            a = await self.resolver.resolve(host, "A")
            aaaa = await self.resolver.resolve(host, "AAAA")
        except DnsTempError as exc:
            raise _HostFailure("4.4.3", f"address lookup for MX host {host} failed: {exc.reason}") from None
        except ValueError:
            raise _HostFailure("4.4.4", f"MX host {host!r} is not a valid name") from None
        ips = [r.address for r in a.records] + [r.address for r in aaaa.records]
        return ips, a.authenticated and aaaa.authenticated

    async def _dane_policy(self, domain: str, host: str) -> HostPolicy | None:
        try:
            found = await dane.lookup(self.resolver, host, self.port)
        except DnsTempError as exc:
            reason = f"TLSA lookup for {host} failed ({exc.reason}); DANE status unknown, not delivering to it"
            log_event("tls_policy", logging.WARNING, domain=domain, mx=host, policy="dane", reason=reason)
            raise _HostFailure("4.7.5", reason, policy=True) from None
        if found is None:
            return None
        return HostPolicy(DANE if found.authenticates else ENCRYPT, "dane", found)

    def _sts_policy(self, domain: str, host: str, sts: StsPolicy | None) -> HostPolicy:
        if sts is None or sts.mode == "none":
            return OPPORTUNISTIC
        if sts.matches(host):
            return HostPolicy(VERIFY if sts.mode == "enforce" else TESTING, "mta-sts")
        reason = f"MX host {host} is not listed in the MTA-STS policy of {domain} ({', '.join(sts.mx)})"
        log_event("tls_policy", logging.WARNING, domain=domain, mx=host, policy=f"mta-sts-{sts.mode}", reason=reason)
        if sts.mode == "enforce":
            raise _HostFailure("4.7.5", reason, policy=True)
        return OPPORTUNISTIC

    # ---- one host -------------------------------------------------------------

    async def _try_host(
        self,
        host: str,
        ips: list[str],
        policy: HostPolicy,
        sender: str,
        recipients: list[str],
        data: bytes,
        domain: str,
    ) -> list[RecipientOutcome]:
        pool = self.pools.get(host)
        if pool is None:
            pool = self.pools[host] = _HostPool(self.max_connections_per_host, self.idle_timeout, self._discard)
        conn = await pool.acquire(lambda c: c.ip in ips and satisfies(c.achieved, policy.level))
        if conn is not None and not await self._reset(conn):
            self._discard(conn)
            conn = None
        keep = False
        try:
            if conn is None:
                conn = await self._connect_any(host, ips, policy, domain)
            outcomes, keep = await self._transaction(conn, sender, recipients, data)
            conn.uses += 1
            return outcomes
        finally:
            pool.release(conn, keep and not self._closed and conn is not None and conn.uses < _MAX_REUSES)

    async def _connect_any(self, host: str, ips: list[str], policy: HostPolicy, domain: str) -> _Conn:
        last: _HostFailure | None = None
        for ip in ips:
            try:
                return await self._open(host, ip, policy, domain)
            except TlsPolicyError as exc:
                log_event(
                    "tls_policy",
                    logging.WARNING,
                    domain=domain,
                    mx=f"{host}[{ip}]",
                    policy=policy.source,
                    required=policy.level,
                    reason=str(exc),
                )
                last = _HostFailure("4.7.5", str(exc), policy=True)
            except _HostFailure as exc:
                last = exc
        assert last is not None
        raise last

    async def _open(self, host: str, ip: str, policy: HostPolicy, domain: str, *, clear: bool = False) -> _Conn:
        """Connect, EHLO, STARTTLS as the policy says; TlsPolicyError or _HostFailure if that cannot be done."""
        remote = f"{host}[{ip}]"
        smtp = aiosmtplib.SMTP(
            hostname=ip,
            port=self.port,
            local_hostname=self.hostname,
            timeout=self.command_timeout,
            use_tls=False,
            start_tls=False,
        )
        self.connections_opened += 1
        try:
            await smtp.connect(timeout=self.connect_timeout)
            await self._hello(smtp, remote)
            if clear or not smtp.supports_extension("starttls"):
                if policy.mandatory:
                    raise TlsPolicyError(
                        f"{remote} does not offer STARTTLS but {policy.source} requires TLS; not sent in clear"
                    )
                if policy.level == TESTING:
                    log_event(
                        "tls_policy",
                        logging.WARNING,
                        domain=domain,
                        mx=remote,
                        policy="mta-sts-testing",
                        reason="no STARTTLS offered; delivering in clear (testing mode)",
                    )
                return _Conn(smtp, host, ip, "none", "")
            verify = policy.level in (VERIFY, TESTING)
            try:
                await smtp.starttls(
                    server_hostname=host,
                    tls_context=self._verify_ctx if verify else self._plain_ctx,
                    timeout=self.command_timeout,
                )
            except ssl.SSLCertVerificationError as exc:
                reason = f"certificate of {remote} does not verify for {host}: {exc.verify_message or exc}"
                if policy.level == TESTING:
                    log_event(
                        "tls_policy",
                        logging.WARNING,
                        domain=domain,
                        mx=remote,
                        policy="mta-sts-testing",
                        reason=reason + "; delivering anyway (testing mode)",
                    )
                    smtp.close()
                    return await self._open(host, ip, OPPORTUNISTIC, domain)
                raise TlsPolicyError(reason) from None
            except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
                if policy.mandatory:
                    raise TlsPolicyError(f"STARTTLS with {remote} failed: {exc}") from None
                smtp.close()  # opportunistic: the handshake failed, so go in clear as other MTAs do
                return await self._open(host, ip, policy, domain, clear=True)
            ssl_object = smtp.get_transport_info("ssl_object")
            version = ssl_object.version() if ssl_object is not None else "TLS"
            achieved, label = ("verified", f"{version} mta-sts") if verify else ("tls", version)
            if policy.level == DANE and policy.dane is not None:
                try:
                    kind = dane.verify(policy.dane, dane.peer_chain(ssl_object), [host])
                except dane.DaneError as exc:
                    raise TlsPolicyError(
                        f"DANE: certificate of {remote} does not match its TLSA records: {exc}"
                    ) from None
                achieved, label = "dane", f"{version} {kind}"
            elif policy.level == ENCRYPT:
                label = f"{version} dane-encrypt"
            await self._hello(smtp, remote)  # RFC 3207 §4.2: forget what was said in clear
            return _Conn(smtp, host, ip, achieved, label)
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            enhanced, text = _enhanced(exc.code, exc.message)
            raise _HostFailure(
                "4.4.2" if exc.code < 500 else enhanced, f"{remote} greeted with {exc.code} {text}", exc.code
            ) from None
        except TlsPolicyError:
            await self._quit(smtp)
            raise
        except _HostFailure:
            await self._quit(smtp)
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            smtp.close()
            raise _HostFailure("4.4.1", f"{remote}: {type(exc).__name__}: {exc}") from None

    async def _hello(self, smtp: aiosmtplib.SMTP, remote: str) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            if not smtp.is_connected:
                raise
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as exc2:
                raise _HostFailure("4.4.2", f"{remote} refused EHLO and HELO: {exc2.code} {exc2.message}") from exc

    async def _reset(self, conn: _Conn) -> bool:
        """RSET before reusing a connection; False if it is no longer usable."""
        try:
            response = await conn.smtp.execute_command(b"RSET", timeout=self.command_timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return response.code == 250

    async def _transaction(
        self, conn: _Conn, sender: str, recipients: list[str], data: bytes
    ) -> tuple[list[RecipientOutcome], bool]:
        """MAIL, RCPT..., DATA on an open connection: (outcomes, whether the connection can be reused)."""
        smtp = conn.smtp

        def outcome(rcpt: str, status: Status, code: int | None, enhanced: str, text: str) -> RecipientOutcome:
            return RecipientOutcome(rcpt, status, code, enhanced, text, conn.remote, conn.tls)

        def from_reply(rcpt: str, code: int, message: str) -> RecipientOutcome:
            enhanced, text = _enhanced(code, message)
            status: Status = "delivered" if 200 <= code < 300 else _status(code)
            return outcome(rcpt, status, code, enhanced, text)

        utf8 = not (sender + "".join(recipients)).isascii()
        if utf8 and not smtp.supports_extension("smtputf8"):
            text = f"{conn.remote} does not support SMTPUTF8, needed for these addresses"
            return [outcome(r, "failed", None, "5.6.7", text) for r in recipients], True
        options = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}".encode())
        if smtp.supports_extension("8bitmime") and not data.isascii():
            options.append(b"BODY=8BITMIME")
        if utf8:
            options.append(b"SMTPUTF8")
        try:
            reply = await smtp.execute_command(b"MAIL", f"FROM:<{sender}>".encode(), *options)
            if reply.code >= 500:
                return [from_reply(r, reply.code, _reply_text(reply)) for r in recipients], smtp.is_connected
            if reply.code != 250:
                enhanced, text = _enhanced(reply.code, _reply_text(reply))
                raise _HostFailure(enhanced, f"{conn.remote} said {reply.code} {text} to MAIL FROM", reply.code)
            results: dict[str, RecipientOutcome] = {}
            accepted: list[str] = []
            for rcpt in recipients:
                reply = await smtp.execute_command(b"RCPT", f"TO:<{rcpt}>".encode())
                if reply.code in (250, 251):
                    accepted.append(rcpt)
                else:
                    results[rcpt] = from_reply(rcpt, reply.code, _reply_text(reply))
                if not smtp.is_connected:  # 421: the remote is going away
                    break
            for rcpt in recipients:
                if rcpt not in results and rcpt not in accepted:
                    results[rcpt] = outcome(rcpt, "deferred", None, "4.4.2", f"{conn.remote} closed the connection")
            if not accepted:
                reusable = smtp.is_connected and await self._reset(conn)
                return [results[r] for r in recipients], reusable
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise _HostFailure("4.4.2", f"{conn.remote}: {type(exc).__name__}: {exc}") from None
        try:
            reply = await smtp.data(data, timeout=self.data_timeout)
            for rcpt in accepted:
                results[rcpt] = from_reply(rcpt, reply.code, _reply_text(reply))
        except aiosmtplib.SMTPResponseException as exc:  # SMTPDataError: a reply other than 354 / 250
            for rcpt in accepted:
                results[rcpt] = from_reply(rcpt, exc.code, " ".join(exc.message.split("\n")))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # The message may or may not have arrived; deferring risks a duplicate, never a loss.
            for rcpt in accepted:
                results[rcpt] = outcome(rcpt, "deferred", None, "4.4.2", f"{conn.remote}: {type(exc).__name__}: {exc}")
            return [results[r] for r in recipients], False
        return [results[r] for r in recipients], smtp.is_connected

    # ---- closing connections ------------------------------------------------

    def _discard(self, conn: _Conn) -> None:
        """Say QUIT in the background (a pool decides synchronously); close() waits for these."""
        task = asyncio.get_running_loop().create_task(self._quit(conn.smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, smtp: aiosmtplib.SMTP) -> None:
        if not smtp.is_connected:
            return
        try:
            await smtp.quit(timeout=_QUIT_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()
