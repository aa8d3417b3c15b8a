"""The relay transport: every message goes to one smart host (Postfix's `relayhost`).

Many servers may not send on port 25 themselves (cloud providers block it) or
must hand mail to an ISP's or a company's relay. With `delivery.relay_host`
set, the queue runner gives every message to this transport instead of the
MX transport. By default (`delivery.relay_tls`) the session must be upgraded
with STARTTLS and the relay's certificate must be valid for the configured
host name (system CAs plus `delivery.ca_file`); otherwise the attempt is
deferred and nothing is sent in clear.

The SMTP commands are written here on aiosmtplib's command layer rather than
through `sendmail`, so every recipient gets its own outcome (a relay may
refuse one recipient and take the others) and addresses are sent exactly as
they were queued (aiosmtplib's address parser rewrites unusual ones).
Idle connections are kept for a few seconds and reused.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

from mailwarden.config import Config, parse_address
from mailwarden.outbound.interfaces import RecipientOutcome

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_MAX_IDLE = 20  # idle connections kept for reuse (the runner sends at most 20 at once by default)


class RelayError(Exception):
    """The relay could not be reached or refused the session; every recipient gets `outcome`."""

    def __init__(self, status: str, code: int | None, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.code = code
        self.enhanced = enhanced
        self.text = text


def has_bare_cr_or_lf(message: bytes) -> bool:
    """A CR or LF that is not part of CRLF: such a message could smuggle a second one."""
    return _BARE_CR_LF.search(message) is not None


def split_reply(code: int, message: str) -> tuple[str, str]:
    """(RFC 3463 status, one-line text) of an SMTP reply; the status from the code class when absent."""
    text = " ".join(message.split())[:1000]
    found = _ENHANCED.match(text)
    if found and found.group(1) == str(code)[0]:
        return found.group(0), text
    return f"{code // 100}.0.0", text


def _safe_address(address: str) -> bool:
    return len(address) <= 320 and not any(c in address for c in "<> \t\r\n\x00") and address.isprintable()


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    remote: str
    tls: str
    idle_since: float = 0.0


class RelayTransport:
    """`Transport` (outbound/interfaces.py) to one smart host."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        require_tls: bool = True,
        ca_file: Path | None = None,
        helo_name: str = "localhost",
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        idle_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.require_tls = require_tls
        self.helo_name = helo_name
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.idle_timeout = idle_timeout
        if require_tls:
            self.tls_context = ssl.create_default_context()
            if ca_file is not None:
                self.tls_context.load_verify_locations(cafile=str(ca_file))
        else:  # opportunistic: encrypt when offered, authenticate nothing
            self.tls_context = ssl.create_default_context()
            self.tls_context.check_hostname = False
            self.tls_context.verify_mode = ssl.CERT_NONE
        self.tls_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._idle: list[_Connection] = []

    @classmethod
    def from_config(cls, cfg: Config) -> RelayTransport:
        host, port = parse_address("delivery.relay_host", cfg.get("delivery.relay_host"))

        def opt(key: str, default: Any) -> Any:
            try:
                return cfg.get(key)
            except KeyError:  # a delivery.* timeout the MX transport's options may not define
                return default

        ca = opt("delivery.ca_file", "")
        return cls(
            host,
            port,
            require_tls=cfg.get("delivery.relay_tls"),
            ca_file=cfg.path("delivery.ca_file") if ca else None,
            helo_name=cfg.get("server.hostname"),
            connect_timeout=opt("delivery.connect_timeout", 30.0),
            command_timeout=opt("delivery.command_timeout", 300.0),
            data_timeout=opt("delivery.data_timeout", 600.0),
            idle_timeout=opt("delivery.idle_timeout", 5.0),
        )

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def send(self, sender: str, recipients: Sequence[str], message: bytes, domain: str) -> list[RecipientOutcome]:
        if has_bare_cr_or_lf(message):
            return self._all(recipients, "failed", None, "5.6.0", "message has a bare CR or LF; not sent")
        bad = [r for r in (sender, *recipients) if r and not _safe_address(r)]
        if bad:
            return self._all(recipients, "failed", None, "5.1.3", f"address not sendable: {bad[0][:100]!r}")
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        try:
            conn = await self._acquire()
        except RelayError as exc:
            return self._all(recipients, exc.status, exc.code, exc.enhanced, exc.text)
        outcomes: dict[str, RecipientOutcome] = {}
        reusable = False
        try:
            reusable = await self._transaction(conn, sender, recipients, message, outcomes)
        except aiosmtplib.SMTPResponseException as exc:  # a reply that ends the session (421...)
            enhanced, text = split_reply(exc.code, exc.message)
            status = "failed" if exc.code >= 500 else "deferred"
            for r in recipients:
                outcomes.setdefault(r, RecipientOutcome(r, status, exc.code, enhanced, text, conn.remote, conn.tls))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            text = f"lost connection with relay {self.name}: {exc or type(exc).__name__}"
            for r in recipients:
                outcomes.setdefault(r, RecipientOutcome(r, "deferred", None, "4.4.2", text, conn.remote, conn.tls))
        finally:
            self._release(conn, reusable)
        return [outcomes[r] for r in recipients]

    async def _transaction(
        self,
        conn: _Connection,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        outcomes: dict[str, RecipientOutcome],
    ) -> bool:
        """One MAIL/RCPT/DATA transaction; fills `outcomes`; True if the connection may be reused."""
        smtp = conn.smtp

        def outcome(r: str, code: int, message_text: str) -> RecipientOutcome:
            enhanced, text = split_reply(code, message_text)
            status = "delivered" if 200 <= code < 300 else "failed" if code >= 500 else "deferred"
            return RecipientOutcome(r, status, code, enhanced, text, conn.remote, conn.tls)

        options: list[bytes] = []
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            if not smtp.supports_extension("smtputf8"):
                for r in recipients:
                    outcomes[r] = RecipientOutcome(
                        r, "failed", None, "5.6.7", f"relay {self.name} does not support SMTPUTF8", conn.remote
                    )
                return True
            options.append(b"SMTPUTF8")
        if not message.isascii() and smtp.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if smtp.supports_extension("size"):
            options.append(b"SIZE=%d" % len(message))
        reply = await smtp.execute_command(b"MAIL", b"FROM:<" + sender.encode() + b">", *options)
        if reply.code != 250:
            for r in recipients:
                outcomes[r] = outcome(r, reply.code, reply.message)
            return await self._reset(smtp, reply.code)
        accepted: list[str] = []
        for r in recipients:
            reply = await smtp.execute_command(b"RCPT", b"TO:<" + r.encode() + b">")
            if reply.code in (250, 251):
                accepted.append(r)
            else:
                outcomes[r] = outcome(r, reply.code, reply.message)
                if reply.code == 421:
                    return False
        if not accepted:
            return await self._reset(smtp, 0)
        try:
            reply = await smtp.data(message, timeout=self.data_timeout)
            code, text = reply.code, reply.message
        except aiosmtplib.SMTPDataError as exc:
            code, text = exc.code, exc.message
        for r in accepted:
            outcomes[r] = outcome(r, code, text)
        return code != 421 and smtp.is_connected

    @staticmethod
    async def _reset(smtp: aiosmtplib.SMTP, code: int) -> bool:
        """End a transaction that sent no message; whether the connection is still usable."""
        if code == 421 or not smtp.is_connected:
            return False
        try:
            return (await smtp.execute_command(b"RSET")).code == 250
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False

    async def _acquire(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since <= self.idle_timeout and conn.smtp.is_connected:
                try:
                    if (await conn.smtp.execute_command(b"RSET")).code == 250:
                        return conn
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    pass
            conn.smtp.close()
        return await self._connect()

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and conn.smtp.is_connected and len(self._idle) < _MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            asyncio.get_running_loop().call_later(self.idle_timeout + 0.1, self._expire_idle)
        else:
            conn.smtp.close()

    def _expire_idle(self) -> None:
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since > self.idle_timeout:
                conn.smtp.close()
            else:
                keep.append(conn)
        self._idle = keep

    async def _connect(self) -> _Connection:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.helo_name,
            timeout=self.command_timeout,
            start_tls=False,
            tls_context=self.tls_context,
        )
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:  # a greeting other than 220
            enhanced, text = split_reply(exc.code, exc.message)
            raise RelayError("deferred", exc.code, enhanced, f"relay {self.name} refused the session: {text}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise RelayError("deferred", None, "4.4.1", f"cannot connect to relay {self.name}: {exc}") from None
        peer = smtp.get_transport_info("peername")
        remote = f"{self.host} [{peer[0]}]" if peer else self.host
        try:
            await smtp.ehlo()
            if smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls()
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise RelayError(
                        "deferred", None, "4.7.5", f"TLS with relay {self.name} failed: {exc.__class__.__name__}: {exc}"
                    ) from None
                await smtp.ehlo()
            elif self.require_tls:
                raise RelayError(
                    "deferred",
                    None,
                    "4.7.4",
                    f"relay {self.name} does not offer STARTTLS, which delivery.relay_tls requires",
                )
        except RelayError:
            smtp.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            enhanced, text = split_reply(exc.code, exc.message)
            raise RelayError("deferred", exc.code, enhanced, f"relay {self.name} refused the session: {text}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            raise RelayError("deferred", None, "4.4.2", f"lost connection with relay {self.name}: {exc}") from None
        ssl_object = smtp.get_transport_info("ssl_object")
        tls = ""
        if ssl_object is not None:
            tls = ssl_object.version() + (" verified" if self.require_tls else "")
        return _Connection(smtp, remote, tls)

    def _all(
        self, recipients: Sequence[str], status: str, code: int | None, enhanced: str, text: str
    ) -> list[RecipientOutcome]:
        return [RecipientOutcome(r, status, code, enhanced, text) for r in recipients]  # type: ignore[arg-type]

    async def close(self) -> None:
        """Say QUIT on idle connections (politely, but without waiting long)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await asyncio.wait_for(conn.smtp.quit(), 2)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                conn.smtp.close()
