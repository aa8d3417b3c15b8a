"""The data stage of inbound checks, and the one verdict that merges them.

Runs SPF, DKIM and ARC concurrently, then DMARC on their results, then maps
each result through the policy (`InboundPolicy.actions`, like Postfix's
restriction lists: what a result means is data, not code) and merges:
the most severe action wins, scores add up, and a total over the junk or
reject threshold raises the action. The same `Verdict` renders the SMTP
reply, the Authentication-Results header, the log line and `inspect`.

Not yet wired into the SMTP listener (next step of the inbound issue);
`mailwarden inspect` runs it offline on a message file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailwarden.checks.arc import evaluate_arc
from mailwarden.checks.dkim import evaluate_dkim
from mailwarden.checks.dmarc import DkimIdentity, SpfIdentity, evaluate_dmarc
from mailwarden.checks.dnsbl import DnsblZone, check_domain, check_ip
from mailwarden.checks.from_header import FromHeaderError, parse_author
from mailwarden.checks.result import Action, CheckResult
from mailwarden.checks.rules import ATTACHMENT_RULES, RulesCheck, RulesConfig, rule_actions
from mailwarden.checks.spf import evaluate_spf
from mailwarden.dns import eager
from mailwarden.dns.resolver import Resolver
from mailwarden.pipeline.auth_results import render_auth_results, strip_claimed_auth_results
from mailwarden.pipeline.content import ContentStage, UriblCheck
from mailwarden.pipeline.strip import strip_parts
from mailwarden.protocol.smtp_reply import SmtpReply

# What each result means unless the administrator says otherwise: an action
# name, or a score to add. Keys are "<check>.<result>" (DMARC's applied
# policy for "dmarc.reject" / "dmarc.quarantine").
DEFAULT_ACTIONS: dict[str, str | float] = {
    "from.invalid": "reject",
    "from.impersonation": "reject",  # display name holds an address in one of our domains, the address does not
    "from.lookalike": 2.0,  # display name holds some other domain's address
    "dmarc.reject": "reject",
    "dmarc.quarantine": "junk",
    "dmarc.temperror": "tempfail",
    "spf.fail": 3.0,
    "spf.softfail": 1.0,
    "spf.permerror": 1.0,
    "dkim.fail": 1.0,
    "dkim.policy": 0.5,
    "arc.fail": 1.0,
    **rule_actions("reject"),  # the content rules (checks/rules.py); server.py applies content.attachment_action
}


@dataclass(frozen=True)
class InboundEnvelope:
    ip: str
    helo: str
    mail_from: str  # "" for the null reverse-path
    rcpts: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()  # the local accounts the recipients resolve to (personal spam models)


@dataclass(frozen=True)
class InboundPolicy:
    authserv_id: str
    actions: Mapping[str, str | float] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    junk_score: float = 5.0
    reject_score: float = 10.0
    trusted_arc_sealers: tuple[str, ...] = ()
    local_domains: frozenset[str] = frozenset()  # our hosted domains, for impersonation checks
    zones: tuple[DnsblZone, ...] = ()  # domain zones are asked about the links in the body
    max_body_lookups: int = 20
    disabled: frozenset[str] = (
        frozenset()
    )  # checks not to run: "spf", "dkim", "arc", "dmarc", "uribl", "dnsbl", "rules", "spam"
    local_names: frozenset[str] = frozenset()  # normalised names of local users and content.protected_names
    rules: RulesConfig | None = None  # None: the built-in defaults (checks/rules.py)


@dataclass
class Verdict:
    action: Action
    score: float
    reasons: list[str]
    results: list[CheckResult]
    header: bytes  # our Authentication-Results field, CRLF-terminated
    removed_forgeries: int = 0
    elapsed: float = 0.0
    stripped: list[str] = field(default_factory=list)  # attachments removed (content.attachment_action = strip)

    def smtp_reply(self) -> SmtpReply | None:
        """The refusal to send after DATA, or None to accept."""
        why = "; ".join(self.reasons[:2]) or "policy"
        for r in self.results:
            # A content filter's own reply (clamav-milter's virus name) reaches the client as it wrote it.
            if (
                r.action is self.action
                and self.action in (Action.REJECT, Action.TEMPFAIL)
                and "smtp_reply" in r.details
            ):
                code, enhanced, text = r.details["smtp_reply"]
                return SmtpReply(code, enhanced, text or why)
        if self.action is Action.REJECT:
            return SmtpReply(550, "5.7.1", f"Message refused: {why}")
        if self.action is Action.TEMPFAIL:
            return SmtpReply(451, "4.7.1", f"Try again later: {why}")
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "score": self.score,
            "reasons": self.reasons,
            "authentication_results": self.header.decode("utf-8", "replace").rstrip("\r\n"),
            "removed_forged_auth_results": self.removed_forgeries,
            "elapsed_ms": round(self.elapsed * 1000, 1),
            "stripped": self.stripped,
            "checks": [
                {
                    "check": r.check,
                    "result": r.result,
                    "reason": r.reason,
                    "action": r.action.value,
                    "score": r.score,
                    "elapsed_ms": round(r.elapsed * 1000, 1),
                    "dns_lookups": r.dns_lookups,
                    **({"details": r.details} if r.check == "spam" else {}),  # probability, top features
                }
                for r in self.results
            ],
        }


async def evaluate_message(
    message: bytes,
    envelope: InboundEnvelope,
    resolver: Resolver,
    policy: InboundPolicy,
    earlier: Sequence[CheckResult] = (),
    content: ContentStage | None = None,
) -> tuple[Verdict, bytes]:
    """The verdict, and the message with forged Authentication-Results removed and ours prepended.

    `earlier` are results from the connect/mail/rcpt stages (block lists) that
    did not refuse at the time but count in the verdict.
    """
    started = time.monotonic()
    cleaned, removed = strip_claimed_auth_results(message, policy.authserv_id)
    results: list[CheckResult] = list(earlier)
    try:
        author = parse_author(cleaned)
    except FromHeaderError as exc:
        author = None
        results.append(CheckResult(check="from", result="invalid", reason=f"From header: {exc.reason}"))
    else:
        impersonation = display_name_impersonation(
            author.display_name, author.domain, policy.local_domains, policy.local_names
        )
        if impersonation is not None and not (impersonation.check == "rules" and "rules" in policy.disabled):
            results.append(impersonation)
    off = policy.disabled
    if content is None:
        content = inbound_content_stage(policy, resolver)
    # Checks that read the authentication results (the spam classifier) run after them.
    late = [c for c in content.checks if getattr(c, "uses_auth", False) and c.name not in off]
    spf, dkim, arc, content_results = await eager.gather(
        _maybe(
            "spf",
            off,
            evaluate_spf(envelope.ip, envelope.helo, envelope.mail_from, resolver, receiver=policy.authserv_id),
        ),
        _maybe("dkim", off, evaluate_dkim(cleaned, resolver)),
        _maybe(
            "arc",
            off,
            evaluate_arc(cleaned, resolver, trusted_sealers=policy.trusted_arc_sealers, remote_ip=envelope.ip),
        ),
        content.run(cleaned, "inbound", off | {c.name for c in late}),
    )
    results += [r for r in (spf, dkim, arc) if r.result != "off"]
    results += content_results
    if author is not None and "dmarc" not in off:
        spf_identity = SpfIdentity(
            spf.result,
            str(spf.details.get("domain", "")),
            "helo" if spf.details.get("identity") == "helo" else "mfrom",
        )
        dkim_identities = [DkimIdentity(result, domain) for result, domain in dkim.details.get("results", [])]
        dmarc = await evaluate_dmarc(author.domain, spf_identity, dkim_identities, resolver)
        results.append(dmarc)
    for check in late:
        results.append(await check.check(cleaned, "inbound", auth=tuple(results), users=envelope.accounts))  # type: ignore[call-arg]
    verdict = merge(results, policy)
    verdict.removed_forgeries = removed
    cleaned = _strip_attachments(cleaned, verdict, policy)
    verdict.elapsed = time.monotonic() - started
    return verdict, verdict.header + cleaned


def _strip_attachments(message: bytes, verdict: Verdict, policy: InboundPolicy) -> bytes:
    """strip-and-notify: remove the parts the attachment rules named, when the verdict still delivers.

    A message the rules flagged but whose parts cannot be removed (unreadable
    MIME, or the finding is not tied to one part) is quarantined instead: it
    must not reach the mailbox with the attachment in it.
    """
    rules = policy.rules or RulesConfig()
    if rules.attachment_action != "strip" or verdict.action.severity >= Action.QUARANTINE.severity:
        return message
    hits = [r for r in verdict.results if r.check == "rules" and r.result in ATTACHMENT_RULES]
    if not hits:
        return message
    reasons: dict[int, str] = {}
    for r in hits:
        for index in r.details.get("parts", ()):
            reasons.setdefault(index, f"{r.result.replace('_', ' ')}: {r.reason}")
    stripped, names = strip_parts(message, reasons) if reasons else (message, [])
    if not names or any(not r.details.get("parts") for r in hits):
        verdict.action = Action.QUARANTINE
        verdict.reasons.append("attachments could not be stripped: quarantined")
        return message
    verdict.stripped = names
    verdict.reasons.append("stripped attachments: " + ", ".join(names))
    return stripped


_ADDRESS_IN_NAME = re.compile(r"[A-Za-z0-9._%+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


_ROLE_NAMES = frozenset(
    [
        "info",
        "admin",
        "support",
        "sales",
        "contact",
        "mail",
        "office",
        "team",
        "hello",
        "noreply",
        "no-reply",
        "postmaster",
        "abuse",
        "webmaster",
        "billing",
    ]
)


def normalise_name(name: str) -> str:
    """A display name or local part as letters and digits only, lower-case: "John.Smith" == "john smith"."""
    return "".join(c for c in name.casefold() if c.isalnum())


def local_user_names(addresses: Iterable[str], extra: Iterable[str] = ()) -> frozenset[str]:
    """The names outside mail must not wear: local parts of our accounts (not role names, not too short)
    and the configured `content.protected_names`."""
    names = set()
    for address in addresses:
        local = address.rpartition("@")[0]
        if local.lower() in _ROLE_NAMES:
            continue
        n = normalise_name(local)
        if len(n) >= 5:
            names.add(n)
    names.update(n for n in (normalise_name(e) for e in extra) if n)
    return frozenset(names)


def display_name_impersonation(
    display_name: str,
    author_domain: str,
    local_domains: frozenset[str],
    local_names: frozenset[str] = frozenset(),
) -> CheckResult | None:
    """`"ceo@ourdomain" <x@attacker>`: DMARC checks the real address, so this is caught here.

    An address of one of our own domains in the display name of mail from
    elsewhere is impersonation (reject by default); any other foreign
    address there is only suspicious (a score), since mailing lists write
    "alice@example.org via List". A display name that is one of our users'
    names, or names one of our domains, on mail from outside our domains is
    `rules.display_name_spoof` (a score: the user may write from a private
    address too).
    """
    for match in _ADDRESS_IN_NAME.finditer(display_name):
        shown = match.group(1).lower()
        if shown == author_domain or shown.endswith("." + author_domain):
            continue
        if shown in local_domains:
            return CheckResult(
                check="from",
                result="impersonation",
                reason=f"display name shows {match.group(0)} (our domain) but the address is in {author_domain}",
            )
        return CheckResult(
            check="from",
            result="lookalike",
            reason=f"display name shows {match.group(0)} but the address is in {author_domain}",
        )
    if author_domain in local_domains or not display_name:
        return None
    lowered = display_name.lower()
    for domain in local_domains:
        if re.search(rf"(?<![a-z0-9.-]){re.escape(domain)}(?![a-z0-9-])", lowered):
            return CheckResult(
                check="rules",
                result="display_name_spoof",
                reason=f"display name {display_name[:80]!r} names our domain {domain}, sent from {author_domain}",
            )
    name = normalise_name(display_name)
    if name and name in local_names:
        return CheckResult(
            check="rules",
            result="display_name_spoof",
            reason=f"display name {display_name[:80]!r} is a local user's name, sent from {author_domain}",
        )
    return None


def inbound_content_stage(
    policy: InboundPolicy, resolver: Resolver, hosted: Callable[[], Iterable[str]] | None = None
) -> ContentStage:
    """The content checks for this policy (the same stage serves outbound mail; pipeline/content.py).

    `hosted` gives the current hosted domains (the server passes the live
    directory); by default the policy's `local_domains`.
    """
    rules = policy.rules or RulesConfig(actions={k: v for k, v in policy.actions.items() if k.startswith("rules.")})
    return ContentStage(
        [
            UriblCheck(policy.zones, resolver, policy.max_body_lookups),
            RulesCheck(rules, hosted or (lambda: policy.local_domains)),
        ]
    )


async def _maybe(name: str, disabled: frozenset[str], work: Awaitable[CheckResult]) -> CheckResult:
    """Run a check unless the administrator turned it off."""
    if name in disabled:
        if isinstance(work, Coroutine):
            work.close()  # never started
        return CheckResult(check=name, result="off", reason="disabled in config")
    return await work


async def evaluate_reputation(
    ip: str,
    helo: str,
    sender: str,
    policy: InboundPolicy,
    resolver: Resolver,
    ip_result: CheckResult | None = None,
) -> list[CheckResult]:
    """The block list stage: the client IP, and the HELO and MAIL FROM domains.

    The endpoint asks at the first RCPT (and refuses a reject there); `inspect`
    asks before the data stage. `ip_result` reuses a session's earlier answer.
    """
    if not policy.zones or "dnsbl" in policy.disabled:
        return []
    if ip_result is None:
        ip_result = await check_ip(ip, policy.zones, resolver)
    lookups = [check_domain(helo, policy.zones, resolver)]
    if sender:
        lookups.append(check_domain(sender, policy.zones, resolver))
    return [ip_result, *await eager.gather(*lookups)]


def _policy_key(result: CheckResult) -> str:
    if result.check == "dmarc" and result.result == "fail":
        return f"dmarc.{result.details.get('disposition', 'none')}"
    return f"{result.check}.{result.result}"


def merge(results: list[CheckResult], policy: InboundPolicy) -> Verdict:
    """One verdict: the most severe action, scores added, thresholds applied, reasons kept."""
    action = Action.NONE
    score = 0.0
    reasons: list[str] = []
    arc_override = any(r.check == "arc" and r.details.get("trusted_override") for r in results)
    for r in results:
        meaning = policy.actions.get(_policy_key(r))
        if meaning is None:
            # Block lists carry their own meaning per answer code (zone config).
            if r.action is not Action.NONE:
                meaning = r.action.value
            elif r.score:
                meaning = r.score
            else:
                continue
        if r.check == "dmarc" and arc_override and r.result == "fail":
            reasons.append(f"dmarc fail overridden by a trusted ARC sealer ({r.reason})")
            continue
        if isinstance(meaning, str):
            suggested = Action(meaning)
            if suggested.severity > action.severity:
                action = suggested
            reasons.append(f"{r.check} {r.result}: {r.reason}")
        else:
            score += float(meaning)
            reasons.append(f"{r.check} {r.result} (+{meaning:g}): {r.reason}")
    if score >= policy.reject_score and action.severity < Action.REJECT.severity:
        action = Action.REJECT
    elif score >= policy.junk_score and action.severity < Action.JUNK.severity:
        action = Action.JUNK
    header = render_auth_results(policy.authserv_id, results)
    return Verdict(action, score, reasons, results, header)
