"""The milter stage: the configured filters, stage by stage, for one SMTP transaction.

The SMTP session makes a `MilterChain` at MAIL (when it knows the direction:
authenticated mail is outbound, the rest inbound) and calls it as the
transaction goes: `mail` (the filters' connect, HELO and MAIL steps),
`rcpt` for each recipient we accepted (a filter's refusal refuses only that
recipient), and `message` at the end of DATA (DATA, headers, end of headers,
body, end of message). Filters run in the order configured; at the end of
DATA each one sees the message as the ones before it changed it.

A filter that fails (cannot connect, times out, hangs up, breaks the protocol)
gets its failure mode: `tempfail` refuses the transaction with 451, `accept`
leaves the filter out of this transaction. Either way its `CheckResult` says
result=error with the reason.

What the filters decide joins the data-stage verdict as one `CheckResult`
per filter (check "milter:<name>"): reject and tempfail carry the filter's
own SMTP reply (clamav-milter's virus name reaches the client), discard and
quarantine become Action.QUARANTINE (a discarded message is kept for an
administrator rather than destroyed: a false positive stays recoverable),
and a filter that marks the message as spam with X-Spam: Yes or
X-Spam-Flag: YES (rspamd's "add header" action, spamass-milter below its
reject score) becomes Action.JUNK.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mailwarden.checks.milter import MilterClient, MilterFailure, MilterSpec, Modifications, Step, split_message
from mailwarden.checks.result import Action, CheckResult
from mailwarden.logs import log_event
from mailwarden.protocol import milter as m
from mailwarden.protocol.smtp_reply import SmtpReply, clean_text

_HEADER_NAME = re.compile(rb"[!-9;-~]{1,200}")
_SPAM_MARKS = {b"x-spam": b"yes", b"x-spam-flag": b"yes"}


@dataclass
class MilterContext:
    """What the macros say about this connection and transaction."""

    hostname: str  # our name: j
    listener: str  # {daemon_name}
    ip: str
    port: int
    helo: str
    queue_id: str  # i
    daemon_addr: str = ""
    auth_user: str | None = None
    tls: tuple[str, str, int] | None = None  # version, cipher, bits

    def macros(self) -> dict[str, str]:
        out = {
            "j": self.hostname,
            "{daemon_name}": self.listener,
            "{daemon_addr}": self.daemon_addr,
            "v": "Mailwarden",
            "_": f"[{self.ip}] [{self.ip}]",
            "{client_addr}": self.ip,
            "{client_name}": f"[{self.ip}]",
            "{client_port}": str(self.port),
            "i": self.queue_id,
        }
        if self.auth_user:
            out.update({"{auth_type}": "PLAIN", "{auth_authen}": self.auth_user})
        if self.tls:
            out.update({"{tls_version}": self.tls[0], "{cipher}": self.tls[1], "{cipher_bits}": str(self.tls[2])})
        return out


@dataclass
class _Filter:
    spec: MilterSpec
    client: MilterClient | None = None
    decision: str = "continue"  # the last answer that counts: accept, reject, tempfail, discard, error
    reason: str = ""
    stage: str = ""
    reply: tuple[int, str, str] | None = None


@dataclass
class MilterOutcome:
    """The end-of-message result: the message as the filters left it, one result per filter, envelope changes."""

    message: bytes
    results: list[CheckResult]
    add_rcpts: list[str] = field(default_factory=list)
    del_rcpts: list[str] = field(default_factory=list)
    sender: str | None = None


class MilterChain:
    def __init__(self, specs: Sequence[MilterSpec], ctx: MilterContext, max_message: int, sid: str = "") -> None:
        self.filters = [_Filter(spec) for spec in specs]
        self.ctx = ctx
        self.max_message = max_message
        self.sid = sid
        self.failed: SmtpReply | None = None  # a tempfail-mode failure: the rest of the transaction gets 451
        self.macros = ctx.macros()

    # ---- the stages ---------------------------------------------------------------

    async def mail(self, sender: str, args: Sequence[str]) -> SmtpReply | None:
        """Open each filter and run its connect, HELO and MAIL steps; a refusal refuses MAIL."""
        self.macros["{mail_addr}"] = sender.strip("<>")
        for f in self.filters:
            client = MilterClient(f.spec)
            client.max_body = self.max_message
            f.client = client
            try:
                await client.open()
                ctx = self.ctx
                step = await client.connect(f"[{ctx.ip}]", ctx.ip, ctx.port, self.macros)
                if step.decision == "continue":
                    step = await client.helo(ctx.helo, self.macros)
                if step.decision == "continue":
                    step = await client.mail(
                        sender if sender.startswith("<") else f"<{sender}>", tuple(args), self.macros
                    )
            except MilterFailure as exc:
                refusal = self._failed(f, "mail", exc)
                if refusal is not None:
                    return refusal
                continue
            refusal = self._record(f, "mail", step)
            if refusal is not None:
                self.close()
                return refusal
        return None

    async def rcpt(self, rcpt: str, args: Sequence[str]) -> SmtpReply | None:
        """Each filter's RCPT step; a refusal refuses only this recipient."""
        if self.failed is not None:
            return self.failed
        self.macros["{rcpt_addr}"] = rcpt.strip("<>")
        for f in self._active():
            assert f.client is not None
            try:
                step = await f.client.rcpt(rcpt if rcpt.startswith("<") else f"<{rcpt}>", tuple(args), self.macros)
            except MilterFailure as exc:
                refusal = self._failed(f, "rcpt", exc)
                if refusal is not None:
                    return refusal
                continue
            if step.refuses:
                f.client.done = False  # a recipient refusal ends only that recipient (libmilter's rule)
                code, enhanced, text = step.reply()
                log_event("milter_rcpt_refused", sid=self.sid, milter=f.spec.name, rcpt=clean_text(rcpt), code=code)
                return SmtpReply(code, enhanced, text or "Recipient refused by content filter")
            self._record(f, "rcpt", step)
        return None

    async def message(self, message: bytes) -> MilterOutcome:
        """The data steps and end of message for each filter in order; raises SmtpReply for a failed transaction."""
        if self.failed is not None:
            raise self.failed
        outcome = MilterOutcome(message, [])
        self.macros["{msg_size}"] = str(len(message))
        for f in self.filters:
            if f.client is not None and not f.client.done and f.decision == "continue":
                headers, body = split_message(outcome.message)
                try:
                    step, mods = await f.client.message(headers, body, self.macros)
                    if mods:
                        outcome.message = apply_modifications(
                            outcome.message, mods, bool(f.client.protocol & m.P_HDR_LEADSPC), self.max_message
                        )
                except MilterFailure as exc:
                    refusal = self._failed(f, "eom", exc)
                    outcome.results.append(self.result_of(f, None))
                    if refusal is not None:
                        self.close()
                        raise refusal from None
                    continue
                self._record(f, "eom", step)
                outcome.add_rcpts += [a.strip("<>") for a in mods.add_rcpts]
                outcome.del_rcpts += [a.strip("<>") for a in mods.del_rcpts]
                if mods.sender is not None:
                    outcome.sender = mods.sender.strip("<>")
                outcome.results.append(self.result_of(f, mods))
                if f.decision in ("reject", "tempfail", "discard"):
                    break
            else:
                outcome.results.append(self.result_of(f, None))
        self.close()
        return outcome

    def close(self) -> None:
        for f in self.filters:
            if f.client is not None:
                f.client.close(abort=not f.client.finished)

    # ---- bookkeeping ----------------------------------------------------------------

    def _active(self) -> list[_Filter]:
        return [f for f in self.filters if f.client is not None and not f.client.done and f.decision == "continue"]

    def _record(self, f: _Filter, stage: str, step: Step) -> SmtpReply | None:
        if step.decision in ("continue", "skip"):
            return None
        f.decision, f.stage = step.decision, stage
        if step.refuses:
            f.reply = step.reply()
            f.reason = f"{f.reply[0]} {f.reply[1]} {f.reply[2]}".strip()
            log_event("milter_refused", sid=self.sid, milter=f.spec.name, stage=stage, reply=clean_text(f.reason))
            if stage != "eom":
                return SmtpReply(*f.reply)
        return None

    def _failed(self, f: _Filter, stage: str, exc: MilterFailure) -> SmtpReply | None:
        if f.client is not None:
            f.client.close(abort=True)
            f.client.done = True
        f.decision, f.stage, f.reason = "error", stage, str(exc)
        log_event(
            "milter_failed", logging.WARNING, sid=self.sid, milter=f.spec.name, stage=stage,
            mode=f.spec.failure_mode, error=clean_text(str(exc)),
        )  # fmt: skip
        if f.spec.failure_mode == "tempfail":
            self.failed = SmtpReply(451, "4.7.1", f"Content filter {f.spec.name} unavailable, try again later")
            self.close()
            return self.failed
        return None

    def result_of(self, f: _Filter, mods: Modifications | None) -> CheckResult:
        details: dict[str, Any] = {"stage": f.stage or "eom"}
        if f.reply is not None:
            details["smtp_reply"] = list(f.reply)
        if mods:
            details["modifications"] = mods.summary()
        elapsed = f.client.elapsed if f.client is not None else 0.0
        name = f"milter:{f.spec.name}"
        d = f.decision
        if d == "error":
            action = Action.TEMPFAIL if f.spec.failure_mode == "tempfail" else Action.NONE
            return CheckResult(name, "error", f.reason, action, details=details, elapsed=elapsed)
        if d == "reject":
            return CheckResult(name, "reject", f.reason, Action.REJECT, details=details, elapsed=elapsed)
        if d == "tempfail":
            return CheckResult(name, "tempfail", f.reason, Action.TEMPFAIL, details=details, elapsed=elapsed)
        if d == "discard":
            why = "the filter asked to discard the message; kept in quarantine instead"
            return CheckResult(name, "discard", why, Action.QUARANTINE, details=details, elapsed=elapsed)
        if mods is not None and mods.quarantine is not None:
            why = f"the filter quarantined the message: {mods.quarantine}".rstrip(": ")
            return CheckResult(name, "quarantine", why, Action.QUARANTINE, details=details, elapsed=elapsed)
        if mods is not None and _marks_spam(mods):
            why = "the filter marked the message as spam (X-Spam header)"
            return CheckResult(name, "spam", why, Action.JUNK, details=details, elapsed=elapsed)
        if f.client is None:
            return CheckResult(name, "skipped", "not run for this message", details=details)
        return CheckResult(name, "accept", "accepted by the filter", details=details, elapsed=elapsed)


def _marks_spam(mods: Modifications) -> bool:
    for h in mods.headers:
        want = _SPAM_MARKS.get(h.name.strip().lower().encode())
        if want is not None and h.value.strip().lower().encode().startswith(want):
            return True
    return False


# ---- applying the changes ----------------------------------------------------------------


def _field(name: str, value: str, leadspc: bool) -> bytes:
    """One header field from a filter's name and value, refused if it could smuggle another field."""
    raw_name = name.encode("utf-8", "replace")
    if not _HEADER_NAME.fullmatch(raw_name):
        raise MilterFailure(f"invalid header name from the filter: {name[:40]!r}")
    raw = value.encode("utf-8", "replace").replace(b"\r\n", b"\n")
    if b"\x00" in raw or b"\r" in raw:
        raise MilterFailure(f"invalid header value from the filter for {name[:40]!r}")
    lines = raw.split(b"\n")
    # A continuation line must start with white space, or it would be a new field.
    lines = [lines[0]] + [line if line[:1] in (b" ", b"\t") else b"\t" + line for line in lines[1:] if line.strip()]
    text = b"\r\n".join(lines)
    sep = b":" if leadspc else b": "
    return raw_name + sep + text + b"\r\n"


def apply_modifications(message: bytes, mods: Modifications, leadspc: bool, max_size: int) -> bytes:
    """The message with a filter's header and body changes applied, in the order the filter sent them."""
    end = message.find(b"\r\n\r\n")
    head, body = (message[: end + 2], message[end + 4 :]) if end >= 0 else (message, b"")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    for h in mods.headers:
        if h.code == m.ADDHEADER:
            fields.append(_field(h.name, h.value, leadspc))
        elif h.code == m.INSHEADER:
            fields.insert(min(h.index, len(fields)), _field(h.name, h.value, leadspc))
        else:
            wanted = h.name.strip().lower().encode()
            seen = 0
            for i, f in enumerate(fields):
                if f.split(b":", 1)[0].strip().lower() == wanted:
                    seen += 1
                    if seen == max(h.index, 1):
                        if h.value.strip():
                            fields[i] = _field(h.name, h.value, leadspc)
                        else:
                            del fields[i]
                        break
            else:
                if h.value.strip():
                    fields.append(_field(h.name, h.value, leadspc))
    if mods.body is not None:
        body = re.sub(rb"\r?\n", b"\r\n", bytes(mods.body))
    out = b"".join(fields) + b"\r\n" + body
    if len(out) > max_size:
        raise MilterFailure(f"the filter's changes make the message larger than {max_size} bytes")
    return out


async def run_offline(
    specs: Sequence[MilterSpec], ctx: MilterContext, sender: str, rcpts: Sequence[str], message: bytes, max_size: int
) -> tuple[bytes, list[CheckResult]]:
    """The whole conversation at once, for `mailwarden inspect`: the changed message and the filters' results."""
    chain = MilterChain(specs, ctx, max_size)
    refusal = await chain.mail(f"<{sender}>", ())
    for rcpt in rcpts:
        if refusal is None:
            refusal = await chain.rcpt(f"<{rcpt}>", ())
    if refusal is None:
        try:
            outcome = await chain.message(message)
        except SmtpReply as exc:
            refusal = exc
        else:
            return outcome.message, outcome.results
    chain.close()
    results = [chain.result_of(f, None) for f in chain.filters if f.decision != "continue"]
    if not results:  # a recipient was refused
        action = Action.REJECT if refusal.code >= 500 else Action.TEMPFAIL
        reply = [refusal.code, refusal.enhanced, refusal.text]
        results = [CheckResult("milter", action.value, refusal.line(), action, details={"smtp_reply": reply})]
    return message, results
