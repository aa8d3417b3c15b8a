"""The milter client: one conversation with one filter (rspamd, spamass-milter, clamav-milter, ...).

The MTA side of the milter protocol, version 6, over asyncio streams
(`inet:host:port`, `inet6:[addr]:port` or `unix:/path`). The codec is
protocol/milter.py; this module keeps the conversation's order and rules:

* option negotiation: we offer every action and every protocol flag we can
  honour; the filter's reply says which steps to skip (SMFIP_NO*), which
  steps it will not answer (SMFIP_NR_*: we must not wait, or we hang), and
  which macros it wants at each stage (SETSYMLIST);
* a step's answer is a `Step`: continue, accept (this filter is done with the
  message), reject, tempfail or discard, with the filter's own SMTP reply if
  it gave one (SMFIR_REPLYCODE);
* end of message collects the modifications (headers, body, recipients,
  sender, quarantine) as a `Modifications` for the pipeline to apply;
* every wait has a timeout (connect, command, end of message; PROGRESS
  restarts the last), and any failure raises `MilterFailure` so the caller
  applies the filter's failure mode.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mailwarden.protocol import milter as m

FAILURE_MODES = ("tempfail", "accept")
DIRECTIONS = ("inbound", "outbound", "both")

# The macros sent when a filter does not ask for its own list (as Postfix's defaults).
DEFAULT_MACROS: dict[int, tuple[str, ...]] = {
    m.STAGE_CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}", "{client_name}"),
    m.STAGE_HELO: ("{tls_version}", "{cipher}", "{cipher_bits}"),
    m.STAGE_ENVFROM: ("i", "{auth_type}", "{auth_authen}", "{mail_addr}"),
    m.STAGE_ENVRCPT: ("{rcpt_addr}",),
    m.STAGE_DATA: ("i",),
    m.STAGE_EOH: (),
    m.STAGE_EOM: ("i", "{msg_size}"),
}


class MilterFailure(Exception):
    """The filter could not be reached, timed out, hung up or broke the protocol."""


@dataclass(frozen=True)
class MilterSpec:
    """One configured filter (config `milter.milters`, one table each)."""

    name: str
    address: str  # inet:host:port, inet6:[addr]:port or unix:/path
    connect_timeout: float = 10.0
    timeout: float = 10.0  # each command's reply
    eom_timeout: float = 60.0  # the end-of-message reply (PROGRESS restarts it)
    failure_mode: str = "tempfail"  # or "accept": skip the filter when it fails
    direction: str = "inbound"  # inbound, outbound or both
    max_packet: int = m.DEFAULT_MAX_PACKET

    def applies(self, direction: str) -> bool:
        return self.direction in (direction, "both")


_SPEC_KEYS = {
    "name": str,
    "address": str,
    "connect_timeout": (int, float),
    "timeout": (int, float),
    "eom_timeout": (int, float),
    "failure_mode": str,
    "direction": str,
    "max_packet": int,
}


def parse_specs(raw: list[Any]) -> list[MilterSpec]:
    """Config tables -> specs; raises ValueError naming the problem (config.py turns it into a ConfigError)."""
    specs: list[MilterSpec] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(
                f'entry {i}: expected a table like {{ name = "rspamd", address = "inet:127.0.0.1:11332" }}'
            )
        for key, value in item.items():
            kind = _SPEC_KEYS.get(key)
            if kind is None:
                raise ValueError(f"entry {i}: unknown key {key!r}; one of {', '.join(_SPEC_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"entry {i}: {key} has the wrong type ({value!r})")
        if not isinstance(item.get("address"), str):
            raise ValueError(f"entry {i}: needs an address: expected inet:HOST:PORT or unix:/PATH")
        name = item.get("name")
        if not name or not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
            raise ValueError(f"entry {i}: name must be 1-40 letters, digits, '_', '.' or '-'")
        if name in (s.name for s in specs):
            raise ValueError(f"entry {i}: name {name!r} is used twice")
        spec = MilterSpec(**{k: (float(v) if isinstance(v, int) and "timeout" in k else v) for k, v in item.items()})
        parse_address(spec.address)
        if spec.failure_mode not in FAILURE_MODES:
            raise ValueError(f"{name}: failure_mode must be one of {', '.join(FAILURE_MODES)}")
        if spec.direction not in DIRECTIONS:
            raise ValueError(f"{name}: direction must be one of {', '.join(DIRECTIONS)}")
        if min(spec.connect_timeout, spec.timeout, spec.eom_timeout) <= 0:
            raise ValueError(f"{name}: timeouts must be more than 0 seconds")
        if spec.max_packet < 65536 + 5:
            raise ValueError(f"{name}: max_packet must be at least 65541 (one body chunk)")
        specs.append(spec)
    return specs


def parse_address(address: str) -> tuple[str, str | int]:
    """("unix", path) or (host, port) for inet:host:port, inet:port@host (sendmail's form) and inet6:[addr]:port."""
    kind, sep, rest = address.partition(":")
    if not sep or not rest:
        raise ValueError(f"milter address {address!r}: expected inet:HOST:PORT or unix:/PATH")
    if kind in ("unix", "local"):
        return "unix", rest
    if kind not in ("inet", "inet6"):
        raise ValueError(f"milter address {address!r}: unknown kind {kind!r}")
    if "@" in rest:
        port_s, _, host = rest.partition("@")
    else:
        host, _, port_s = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"milter address {address!r}: expected a host and a port 1-65535")
    return host, int(port_s)


@dataclass(frozen=True)
class Step:
    """A filter's answer to one step."""

    decision: str  # continue, accept, reject, tempfail, discard
    smtp_code: int = 0
    enhanced: str = ""
    text: str = ""

    @property
    def refuses(self) -> bool:
        return self.decision in ("reject", "tempfail")

    def reply(self) -> tuple[int, str, str]:
        """The SMTP reply for a refusal: the filter's own, else sendmail's wording."""
        if self.smtp_code:
            return self.smtp_code, self.enhanced or ("5.7.1" if self.smtp_code >= 500 else "4.7.1"), self.text
        if self.decision == "reject":
            return 550, "5.7.1", "Command rejected"
        return 451, "4.7.1", "Service unavailable - try again later"


CONTINUE = Step("continue")


@dataclass
class Modifications:
    """What a filter asked to change at end of message, in the order asked."""

    headers: list[m.HeaderChange] = field(default_factory=list)
    body: bytearray | None = None
    add_rcpts: list[str] = field(default_factory=list)
    del_rcpts: list[str] = field(default_factory=list)
    sender: str | None = None
    quarantine: str | None = None

    def __bool__(self) -> bool:
        return bool(
            self.headers or self.body is not None or self.add_rcpts or self.del_rcpts or self.sender or self.quarantine
        )

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.headers:
            kinds = {m.ADDHEADER: "add", m.INSHEADER: "insert", m.CHGHEADER: "change"}
            out["headers"] = [f"{kinds[h.code]} {h.name}" for h in self.headers]
        if self.body is not None:
            out["body_replaced"] = len(self.body)
        if self.add_rcpts:
            out["add_rcpts"] = list(self.add_rcpts)
        if self.del_rcpts:
            out["del_rcpts"] = list(self.del_rcpts)
        if self.sender:
            out["sender"] = self.sender
        if self.quarantine is not None:
            out["quarantine"] = self.quarantine
        return out


_DECISIONS = {
    m.ACCEPT: "accept",
    m.CONTINUE: "continue",
    m.DISCARD: "discard",
    m.REJECT: "reject",
    m.TEMPFAIL: "tempfail",
    m.SKIP: "continue",
    m.CONN_FAIL: "tempfail",
    m.SHUTDOWN: "tempfail",
}


class MilterClient:
    """One connection to one filter, for one SMTP transaction (opened at MAIL, closed after the message)."""

    def __init__(self, spec: MilterSpec) -> None:
        self.spec = spec
        self.protocol = 0  # the flags the filter asked for
        self.actions = 0
        self.symlists: dict[int, tuple[str, ...]] = {}
        self.done = False  # the filter accepted or discarded: no more steps
        self.finished = False  # end of message answered: nothing to abort
        self.max_body = 64 << 20  # the most replacement body kept (the chain sets the message size limit)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = m.MilterDecoder(spec.max_packet)
        self._pending: list[m.Reply] = []
        self.elapsed = 0.0

    # ---- connection -------------------------------------------------------------

    async def open(self) -> None:
        started = time.monotonic()
        host, port = parse_address(self.spec.address)
        try:
            if host == "unix":
                opening = asyncio.open_unix_connection(str(port))
            else:
                opening = asyncio.open_connection(host, int(port))
            self._reader, self._writer = await asyncio.wait_for(opening, self.spec.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise MilterFailure(f"cannot connect to {self.spec.address}: {_why(exc)}") from None
        await self._send(m.encode_optneg())
        reply = await self._next(self.spec.timeout)
        if not isinstance(reply, m.OptNeg):
            raise MilterFailure(f"expected the option negotiation reply, got {reply.code!r}")
        if reply.version < 2 or reply.version > m.VERSION:
            raise MilterFailure(f"filter speaks milter version {reply.version}; we speak 2 to {m.VERSION}")
        # Flags we did not offer (RCPT_REJ, the MDS sizes) are ignored: we keep to what we offered.
        self.protocol = reply.protocol & m.OFFERED_PROTOCOL
        self.actions = reply.actions & m.ALL_ACTIONS
        self.symlists = reply.symlists
        self.elapsed += time.monotonic() - started

    def close(self, abort: bool = False) -> None:
        """Say goodbye without waiting (ABORT first if a message was in progress) and drop the connection."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            if not writer.is_closing():
                writer.write((m.encode_simple(m.ABORT) if abort else b"") + m.encode_simple(m.QUIT))
            writer.close()
        except (OSError, RuntimeError):
            pass

    # ---- the steps --------------------------------------------------------------

    async def connect(self, hostname: str, ip: str, port: int, macros: Mapping[str, str]) -> Step:
        return await self._step(
            m.STAGE_CONNECT, m.P_NOCONNECT, m.P_NR_CONN, m.encode_connect(hostname, ip, port), macros
        )

    async def helo(self, helo: str, macros: Mapping[str, str]) -> Step:
        return await self._step(m.STAGE_HELO, m.P_NOHELO, m.P_NR_HELO, m.encode_helo(helo), macros)

    async def mail(self, sender: str, args: tuple[str, ...], macros: Mapping[str, str]) -> Step:
        return await self._step(m.STAGE_ENVFROM, m.P_NOMAIL, m.P_NR_MAIL, m.encode_mail(sender, args), macros)

    async def rcpt(self, rcpt: str, args: tuple[str, ...], macros: Mapping[str, str]) -> Step:
        return await self._step(m.STAGE_ENVRCPT, m.P_NORCPT, m.P_NR_RCPT, m.encode_rcpt(rcpt, args), macros)

    async def message(
        self, headers: list[tuple[bytes, bytes]], body: bytes, macros: Mapping[str, str]
    ) -> tuple[Step, Modifications]:
        """DATA, the headers, end of headers, the body and end of message; the last step's answer and changes."""
        mods = Modifications()
        step = await self._step(m.STAGE_DATA, m.P_NODATA, m.P_NR_DATA, m.encode_simple(m.DATA), macros)
        if step.decision != "continue":
            return step, mods
        if not self.protocol & m.P_NOHDRS:
            lead = bool(self.protocol & m.P_HDR_LEADSPC)
            for name, value in headers:
                # A NUL cannot travel in a milter string; the filter sees a space (the message is unchanged).
                name, value = name.replace(b"\x00", b" "), value.replace(b"\x00", b" ")
                if not lead:
                    value = value.lstrip(b" \t") if value[:1] in (b" ", b"\t") else value
                step = await self._step(None, 0, m.P_NR_HDR, m.encode_header(name, value), {})
                if step.decision != "continue":
                    return step, mods
        step = await self._step(m.STAGE_EOH, m.P_NOEOH, m.P_NR_EOH, m.encode_simple(m.EOH), macros)
        if step.decision != "continue":
            return step, mods
        if not self.protocol & m.P_NOBODY:
            for chunk in m.encode_body(body):
                step = await self._step(None, 0, m.P_NR_BODY, chunk, {}, skip_ok=True)
                if step.decision == "skip":
                    break
                if step.decision != "continue":
                    return step, mods
        await self._send(self._macros(m.STAGE_EOM, macros) + m.encode_simple(m.BODYEOB))
        step = await self._end_of_message(mods)
        self.finished = True
        return step, mods

    # ---- internals --------------------------------------------------------------

    async def _step(
        self,
        stage: int | None,
        skip_flag: int,
        no_reply_flag: int,
        command: bytes,
        macros: Mapping[str, str],
        skip_ok: bool = False,
    ) -> Step:
        if self.done or (skip_flag and self.protocol & skip_flag):
            return CONTINUE
        started = time.monotonic()
        out = self._macros(stage, macros) if stage is not None else b""
        await self._send(out + command)
        if self.protocol & no_reply_flag:
            self.elapsed += time.monotonic() - started
            return CONTINUE
        while True:
            reply = await self._next(self.spec.timeout)
            if reply.code == m.PROGRESS:
                continue
            break
        self.elapsed += time.monotonic() - started
        if reply.code == m.SKIP:
            if not skip_ok:
                raise MilterFailure("SKIP outside the body")
            return Step("skip")
        return self._final(reply)

    def _final(self, reply: m.Reply) -> Step:
        if isinstance(reply, m.ReplyCode):
            decision = "reject" if reply.smtp_code >= 500 else "tempfail"
            self.done = True
            return Step(decision, reply.smtp_code, reply.enhanced, reply.text)
        decision = _DECISIONS.get(reply.code)
        if decision is None:
            raise MilterFailure(f"unexpected reply {reply.code!r} here")
        if decision != "continue":
            self.done = True
        return Step(decision)

    async def _end_of_message(self, mods: Modifications) -> Step:
        started = time.monotonic()
        body_size = 0
        while True:
            reply = await self._next(self.spec.eom_timeout)
            if reply.code == m.PROGRESS:
                continue
            if reply.code in m.FINAL and reply.code != m.SKIP:
                self.elapsed += time.monotonic() - started
                return self._final(reply)
            if isinstance(reply, m.HeaderChange):
                need = m.F_ADDHDRS if reply.code in (m.ADDHEADER, m.INSHEADER) else m.F_CHGHDRS
                self._allowed(need, reply)
                mods.headers.append(reply)
            elif isinstance(reply, m.BodyReplacement):
                self._allowed(m.F_CHGBODY, reply)
                body_size += len(reply.chunk)
                if body_size > self.max_body:
                    raise MilterFailure("replacement body too large")
                if mods.body is None:
                    mods.body = bytearray()
                mods.body += reply.chunk
            elif isinstance(reply, m.Recipient):
                if reply.code == m.DELRCPT:
                    self._allowed(m.F_DELRCPT, reply)
                    mods.del_rcpts.append(reply.address)
                elif reply.code == m.CHGFROM:
                    self._allowed(m.F_CHGFROM, reply)
                    mods.sender = reply.address
                else:
                    self._allowed(m.F_ADDRCPT if reply.code == m.ADDRCPT else m.F_ADDRCPT_PAR, reply)
                    mods.add_rcpts.append(reply.address)
            elif isinstance(reply, m.Quarantine):
                self._allowed(m.F_QUARANTINE, reply)
                mods.quarantine = reply.reason
            else:
                raise MilterFailure(f"unexpected reply {reply.code!r} at end of message")

    def _allowed(self, flag: int, reply: m.Reply) -> None:
        if not self.actions & flag:
            raise MilterFailure(f"filter sent {reply.code!r} without negotiating that action")

    def _macros(self, stage: int | None, macros: Mapping[str, str]) -> bytes:
        if stage is None:
            return b""
        wanted = self.symlists.get(stage, DEFAULT_MACROS.get(stage, ()))
        chosen = {}
        for name in wanted:
            bare = name.strip("{}")
            key = bare if len(bare) == 1 else "{" + bare + "}"
            if key in macros:
                chosen[key] = macros[key]
        if not chosen:
            return b""
        return m.encode_macros(m.STAGE_COMMANDS[stage], chosen)

    async def _send(self, data: bytes) -> None:
        if self._writer is None:
            raise MilterFailure("not connected")
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), self.spec.timeout)
        except (OSError, TimeoutError) as exc:
            raise MilterFailure(f"sending to the filter failed: {_why(exc)}") from None

    async def _next(self, timeout: float) -> m.Reply:
        """The next reply packet, within `timeout` seconds."""
        while not self._pending:
            if self._reader is None:
                raise MilterFailure("not connected")
            try:
                data = await asyncio.wait_for(self._reader.read(65536), timeout)
            except TimeoutError:
                raise MilterFailure(f"no reply within {timeout:g}s") from None
            except OSError as exc:
                raise MilterFailure(f"connection failed: {_why(exc)}") from None
            if not data:
                raise MilterFailure("the filter closed the connection")
            try:
                self._pending.extend(self._decoder.feed(data))
            except m.MilterProtocolError as exc:
                raise MilterFailure(f"protocol error: {exc}") from None
        return self._pending.pop(0)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or type(exc).__name__


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers as (name, value), body) in the form filters expect: folded lines joined by LF, as sendmail does."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = (message, b"") if not message.startswith(b"\r\n") else (b"", message[2:])
    else:
        head, body = message[: end + 2], message[end + 4 :]
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if colon:
            headers.append((name.rstrip(b" \t"), value))
    return headers, body
