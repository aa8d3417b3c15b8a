"""The content rules: named, scored findings about a message's headers, links and attachments.

One `RulesCheck` runs in the content stage (pipeline/content.py), in both
directions, and returns one `CheckResult` per rule that fired, named
`rules.<rule>` in the verdict, so the actions table (`inbound.actions`)
gives each its own action or score:

| rule | fires when |
| --- | --- |
| lookalike_domain | the From, Reply-To or a linked domain imitates a hosted or `content.brand_domains` domain (checks/lookalike.py) |
| reply_to_mismatch | inbound: Reply-To points to another organisation than From |
| link_text_mismatch | an HTML link's text shows one domain while its href goes to another |
| executable_attachment | an attachment (or an archive member) is executable by name or by content |
| blocked_attachment | an attachment's declared type is in `content.blocked_types` |
| encrypted_archive | a zip/7z/rar is password-protected (its content cannot be checked) |
| archive_depth | archives nest deeper than `content.max_archive_depth` |
| archive_size | an archive inflates past `content.max_archive_size`, or like a bomb |

`display_name_spoof` (a local user's name or one of our domains in the
display name of outside mail) needs the directory, so the data stage
(pipeline/inbound.py, `display_name_impersonation`) adds it.

The attachment rules carry the MIME part indexes they found in `details`,
so strip-and-notify (pipeline/strip.py) knows what to remove. Inbound, the
pipeline's actions table decides; outbound (authenticated users, where the
verdict is a hold in the queue) each result carries its own action and score.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import html
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mailwarden.checks import attachments as att
from mailwarden.checks.body_links import MAX_PART_BYTES, _hosts, _part_text  # the URI scanner's text and host rules
from mailwarden.checks.from_header import FromHeaderError, _header_fields, parse_author
from mailwarden.checks.lookalike import LookalikeDetector
from mailwarden.checks.mime_walk import PARSE_ERRORS, Part, shared_walk
from mailwarden.checks.offload import run_cpu_bound
from mailwarden.checks.result import Action, CheckResult
from mailwarden.dns.public_suffix import registrable_domain

ATTACHMENT_RULES = (
    "executable_attachment",
    "blocked_attachment",
    "encrypted_archive",
    "archive_depth",
    "archive_size",
)
MAX_LINK_DOMAINS = 50  # linked domains compared with the protected ones
MAX_ANCHORS = 500
MAX_HTML_BYTES = 2 << 20
MAX_SCAN_BYTES = 64 << 20  # an attachment decoded for inspection (the message size limit is smaller by default)

# The defaults for the actions table (pipeline/inbound.py merges them in); attachment
# rules take `content.attachment_action` unless inbound.actions says otherwise.
DEFAULT_RULE_ACTIONS: dict[str, str | float] = {
    "rules.display_name_spoof": 3.0,
    "rules.lookalike_domain": 5.0,
    "rules.reply_to_mismatch": 1.0,
    "rules.link_text_mismatch": 3.0,
}


def rule_actions(attachment_action: str) -> dict[str, str | float]:
    """The rules' default meanings for a `content.attachment_action` (strip: the message is delivered, stripped)."""
    meaning = {"reject": "reject", "quarantine": "quarantine", "strip": "none"}[attachment_action]
    return {**DEFAULT_RULE_ACTIONS, **{f"rules.{r}": meaning for r in ATTACHMENT_RULES}}


@dataclass(frozen=True)
class RulesConfig:
    brand_domains: tuple[str, ...] = ()
    blocked_extensions: frozenset[str] = frozenset(att.EXECUTABLE_EXTENSIONS)
    blocked_types: frozenset[str] = frozenset(att.BLOCKED_TYPES)
    archive: att.ArchivePolicy = field(default_factory=att.ArchivePolicy)
    attachment_action: str = "reject"  # reject | quarantine | strip
    actions: Mapping[str, str | float] = field(default_factory=lambda: rule_actions("reject"))

    @classmethod
    def from_config(cls, cfg: Any, actions: Mapping[str, str | float] | None = None) -> RulesConfig:
        exts = frozenset(e.lower().lstrip(".") for e in cfg.get("content.blocked_extensions"))
        action = cfg.get("content.attachment_action")
        return cls(
            brand_domains=tuple(d.lower() for d in cfg.get("content.brand_domains")),
            blocked_extensions=exts,
            blocked_types=frozenset(t.lower() for t in cfg.get("content.blocked_types")),
            archive=att.ArchivePolicy(
                max_depth=cfg.get("content.max_archive_depth"),
                max_size=cfg.get("content.max_archive_size"),
                extensions=exts,
            ),
            attachment_action=action,
            actions=dict(actions) if actions is not None else rule_actions(action),
        )


@dataclass
class _Hit:
    rule: str
    reason: str
    part: int | None = None  # the MIME part index, for strip-and-notify
    name: str = ""


class RulesCheck:
    """A ContentCheck (pipeline/content.py) returning one result per rule that fired."""

    name = "rules"

    def __init__(self, config: RulesConfig, hosted: Callable[[], Iterable[str]] = lambda: ()) -> None:
        self.config = config
        self.hosted = hosted
        self._detector: tuple[frozenset[str], LookalikeDetector] | None = None

    def detector(self) -> LookalikeDetector:
        protected = frozenset(self.hosted()) | frozenset(self.config.brand_domains)
        if self._detector is None or self._detector[0] != protected:
            self._detector = (protected, LookalikeDetector(protected))
        return self._detector[1]

    async def check(self, message: bytes, direction: str) -> list[CheckResult]:
        detector = self.detector()
        return await run_cpu_bound(len(message), lambda: self.evaluate(message, direction, detector))

    def evaluate(self, message: bytes, direction: str, detector: LookalikeDetector | None = None) -> list[CheckResult]:
        """Every rule on one message; never raises on hostile input (each part is bounded)."""
        detector = detector or self.detector()
        hits: list[_Hit] = []
        mime = shared_walk(message)
        hits += self._header_rules(message, direction, detector)
        hits += self._link_rules(message, mime.parts, detector)
        hits += self._attachment_rules(mime.attachments())
        if mime.too_deep:
            hits.append(_Hit("archive_depth", "MIME parts nested too deep to inspect"))
        return self._results(hits, direction)

    # ---- headers ----------------------------------------------------------

    def _header_rules(self, message: bytes, direction: str, detector: LookalikeDetector) -> list[_Hit]:
        hits: list[_Hit] = []
        try:
            author = parse_author(message)
        except FromHeaderError:
            author = None  # the data stage refuses an unreadable From; nothing to compare here
        if author is not None:
            found = detector.check(registrable_domain(author.domain) or author.domain)
            if found is not None:
                hits.append(_Hit("lookalike_domain", f"From domain {found.domain} {_imitation(found)}"))
        if direction != "inbound" or author is None:
            return hits
        from_org = registrable_domain(author.domain) or author.domain
        for name, value in _header_fields(message[:65536])[:100]:
            if name.strip().lower() != b"reply-to":
                continue
            text = value.decode("utf-8", "replace")[:2000]
            for _display, addr in email.utils.getaddresses([text])[:20]:
                domain = addr.rpartition("@")[2].strip().lower().rstrip(".>")
                if not domain or "@" not in addr:
                    continue
                org = registrable_domain(domain) or domain
                if org != from_org:
                    hits.append(_Hit("reply_to_mismatch", f"Reply-To {addr} is outside the From domain {from_org}"))
                found = detector.check(org)
                if found is not None:
                    hits.append(_Hit("lookalike_domain", f"Reply-To domain {found.domain} {_imitation(found)}"))
        return hits

    # ---- links ------------------------------------------------------------

    def _link_rules(self, message: bytes, parts: list[Part], detector: LookalikeDetector) -> list[_Hit]:
        hits: list[_Hit] = []
        if detector.protected:
            for domain in _linked_domains(parts):
                found = detector.check(domain)
                if found is not None:
                    hits.append(_Hit("lookalike_domain", f"link to {found.domain} {_imitation(found)}"))
                    break
        for part in parts:
            if part.content_type != "text/html" or part.is_attachment:
                continue
            data = part.payload(MAX_HTML_BYTES)
            if not data:
                continue
            charset = "utf-8"
            try:
                charset = part.message.get_content_charset() or "utf-8" if part.message is not None else "utf-8"
                text = data.decode(charset, "replace")
            except (LookupError, ValueError, TypeError, AttributeError):
                text = data.decode("utf-8", "replace")
            mismatch = link_text_mismatch(text)
            if mismatch:
                hits.append(_Hit("link_text_mismatch", mismatch))
        return hits

    # ---- attachments ------------------------------------------------------

    def _attachment_rules(self, parts: list[Part]) -> list[_Hit]:
        cfg = self.config
        hits: list[_Hit] = []
        for part in parts:
            if part.unreadable:
                continue
            label = part.filename or part.content_type
            why = att.executable_name(part.filename, cfg.blocked_extensions) if part.filename else ""
            if why:
                hits.append(_Hit("executable_attachment", f"{label}: {why}", part.index, label))
                continue
            if part.content_type in cfg.blocked_types:
                hits.append(
                    _Hit("blocked_attachment", f"{label}: type {part.content_type} is blocked", part.index, label)
                )
                continue
            data = part.payload(MAX_SCAN_BYTES) or _head(part)
            for finding in att.inspect_content(label, data, cfg.archive):
                hits.append(_Hit(finding.rule, f"{finding.name}: {finding.why}", part.index, label))
        return hits

    # ---- results ------------------------------------------------------------

    def _results(self, hits: list[_Hit], direction: str) -> list[CheckResult]:
        if not hits:
            return [CheckResult(check="rules", result="none", reason="no rule matched")]
        grouped: dict[str, list[_Hit]] = {}
        for h in hits:
            grouped.setdefault(h.rule, []).append(h)
        results = []
        for rule, rule_hits in grouped.items():
            meaning = self.config.actions.get(f"rules.{rule}", 0.0)
            action, score = Action.NONE, 0.0
            if isinstance(meaning, str):
                action = Action(meaning)
            else:
                score = float(meaning)
            if direction == "outbound" and rule in ATTACHMENT_RULES:
                action = Action.QUARANTINE  # held in the queue with an alert (outbound issue), never stripped
            reasons = list(dict.fromkeys(h.reason for h in rule_hits))
            reason = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
            results.append(
                CheckResult(
                    check="rules",
                    result=rule,
                    reason=reason,
                    action=action,
                    score=score,
                    details={
                        "parts": sorted({h.part for h in rule_hits if h.part is not None}),
                        "names": list(dict.fromkeys(h.name for h in rule_hits if h.name)),
                        "reasons": reasons[:50],
                    },
                )
            )
        return results


def _linked_domains(parts: list[Part]) -> list[str]:
    """Registrable domains linked from the text parts of the walk (no second parse), at most MAX_LINK_DOMAINS."""
    found: dict[str, None] = {}
    for part in parts:
        if part.message is None or part.is_attachment or not part.content_type.startswith("text/"):
            continue
        try:
            text = _part_text(part.message, MAX_PART_BYTES)
        except PARSE_ERRORS:
            continue
        for host in _hosts(text or ""):
            domain = registrable_domain(host)
            if domain is not None:
                found[domain] = None
                if len(found) >= MAX_LINK_DOMAINS:
                    return list(found)
    return list(found)


def _imitation(found: Any) -> str:
    if found.how == "mixed-script":
        return "mixes Latin with Cyrillic or Greek letters"
    return f"imitates {found.imitates} ({found.how})"


def _head(part: Part) -> bytes:
    """The first decoded bytes of a part too large to decode whole: enough for its magic."""
    msg = part.message
    if msg is None:
        return b""
    try:
        raw = msg.get_payload(decode=False)
    except Exception:
        return b""
    if not isinstance(raw, str):
        return b""
    if part.encoding != "base64":
        return raw[: att.MAGIC_BYTES].encode("latin-1", "replace")
    chunk = re.sub(r"\s+", "", raw[: att.MAGIC_BYTES * 2])
    chunk = chunk[: len(chunk) // 4 * 4]
    try:
        return base64.b64decode(chunk)
    except (binascii.Error, ValueError):
        return b""


_ANCHOR = re.compile(r"(?is)<a\b([^>]{0,2000})>")
_HREF = re.compile(r"""(?is)\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""")
_TAG = re.compile(r"(?s)<[^>]{0,2000}>")
_SHOWN = re.compile(r"(?i)(?:https?://)?((?:[a-z0-9\u00a1-\uffff-]+\.)+[a-z\u00a1-\uffff]{2,})(?:[/:?#]|$|\s)")


def link_text_mismatch(html_text: str) -> str:
    """Why an <a> shows one domain and goes to another ("" if none does); bounded by MAX_ANCHORS."""
    pos = 0
    for _ in range(MAX_ANCHORS):
        m = _ANCHOR.search(html_text, pos)
        if m is None:
            return ""
        end = html_text.find("</a", m.end(), m.end() + 2000)
        if end < 0:
            end = html_text.find("</A", m.end(), m.end() + 2000)
        pos = m.end() if end < 0 else end
        if end < 0:
            continue
        href_m = _HREF.search(m.group(1))
        if href_m is None:
            continue
        href = html.unescape(href_m.group(1) or href_m.group(2) or href_m.group(3) or "").strip()
        shown_text = html.unescape(_TAG.sub(" ", html_text[m.end() : end])).strip()
        shown = _SHOWN.search(shown_text)
        if shown is None:
            continue
        try:
            target = urlsplit(href)
            if target.scheme.lower() not in ("http", "https") or not target.hostname:
                continue
            target_host = target.hostname
        except ValueError:
            continue
        shown_org = registrable_domain(_idna(shown.group(1)))
        target_org = registrable_domain(_idna(target_host))
        if shown_org and target_org and shown_org != target_org:
            return f"link text shows {shown_org} but goes to {target_org}"
    return ""


def _idna(host: str) -> str:
    try:
        return host.lower().encode("idna").decode("ascii")
    except UnicodeError:
        return host.lower()
