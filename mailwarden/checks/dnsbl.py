"""DNS block lists (RFC 5782): the connecting IP, and the HELO and MAIL FROM domains.

A zone is data (`DnsblZone`): its name, whether it lists IP addresses or
domains, and what each 127.x answer code means (a `ZoneCode`: meaning, score,
suggested action). Zones are parsed from plain dicts with `parse_zone`, so
config can supply them; `PRESETS` holds documented ones for Spamhaus.

Three rules keep a block list from turning a problem on *our* side into a
verdict on the sender:

* An answer in 127.255.255.0/24 (Spamhaus: typo in the zone name, query via
  a public resolver, too many queries), an answer the zone declares as an
  error code, or any answer outside 127.0.0.0/8 (a resolver rewriting
  NXDOMAIN) is an *error*: no score, an ERROR log line, and an admin alert.
* A zone that lists its own negative test entry (RFC 5782 §5) lists
  everything; its listings are errors too (`zone_is_sane`, cached).
* SERVFAIL or timeout is a temperror with no action: a block list outage
  must not block mail.

Domain zones are queried with a host's registrable domain
(dns/public_suffix.py), here and in the URIBL body check.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from mailwarden.checks.result import Action, CheckResult
from mailwarden.dns import eager
from mailwarden.dns.public_suffix import registrable_domain
from mailwarden.dns.resolver import DnsTempError, QueryCounter, Resolver
from mailwarden.logs import log_event

ZoneKind = Literal["ip", "domain"]

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")
# Spamhaus "return codes for errors"; any other 127.255.255.x is an error too.
_ERROR_MEANINGS = {
    "127.255.255.252": "typo in the block list name",
    "127.255.255.254": "query via a public or open resolver (the list refuses it)",
    "127.255.255.255": "excessive number of queries",
}

# RFC 5782 §5: an IPv4 list MUST NOT list 127.0.0.1, a domain list MUST NOT
# list the reserved name INVALID. (TEST and 127.0.0.2 are the *positive*
# test entries, which a list MUST contain.)
_NEGATIVE_TEST = {"ip": "1.0.0.127", "domain": "invalid"}

SANITY_TTL = 900.0  # seconds a zone_is_sane verdict is trusted


class DnsblConfigError(ValueError):
    """A zone definition that cannot be used; the message names the zone and the problem."""


@dataclass(frozen=True)
class ZoneCode:
    """What one answer code means, and what we suggest doing about it."""

    meaning: str
    score: float
    action: Action = Action.NONE


_UNKNOWN_CODE = ZoneCode("listed (code not described for this zone)", 1.0, Action.NONE)


@dataclass(frozen=True)
class DnsblZone:
    name: str
    kind: ZoneKind
    codes: Mapping[str, ZoneCode] = field(default_factory=dict)
    default: ZoneCode = _UNKNOWN_CODE  # for 127.x codes not in `codes`
    errors: Mapping[str, str] = field(default_factory=dict)  # zone-specific error codes -> meaning
    description: str = ""


# ---- presets (data, not code) ---------------------------------------------------

# Spamhaus ZEN: SBL + CSS + XBL + DROP + PBL in one IP zone. The public mirror
# refuses queries from public resolvers (127.255.255.254) and commercial use;
# with a Data Query Service key, set name = "<key>.zen.dq.spamhaus.net".
# PBL lists end-user ranges that should not deliver straight to an MX; it
# must never be applied to authenticated submission, and only to the
# connecting IP, so it suggests junk rather than reject.
SPAMHAUS_ZEN: dict[str, Any] = {
    "name": "zen.spamhaus.org",
    "kind": "ip",
    "description": "Spamhaus ZEN (SBL, CSS, XBL, DROP, PBL)",
    "codes": {
        "127.0.0.2": {"meaning": "SBL: a verified spam source or spam operation", "score": 6.0, "action": "reject"},
        "127.0.0.3": {"meaning": "SBL CSS: a low-reputation (snowshoe) sender", "score": 4.0, "action": "junk"},
        **{
            f"127.0.0.{n}": {"meaning": "XBL: an exploited or infected host", "score": 6.0, "action": "reject"}
            for n in (4, 5, 6, 7)
        },
        "127.0.0.9": {"meaning": "DROP: a hijacked or criminal network", "score": 10.0, "action": "reject"},
        "127.0.0.10": {"meaning": "PBL: end-user range (declared by its ISP)", "score": 3.0, "action": "junk"},
        "127.0.0.11": {"meaning": "PBL: end-user range (inferred by Spamhaus)", "score": 3.0, "action": "junk"},
    },
}

# Spamhaus DBL: domains, queried with the registrable domain. The "abused
# legit" codes (1xx) are real sites that were compromised or abused, so they
# score lower and never reject on their own. 127.0.1.255 means "IP queries
# prohibited": a bug on our side.
SPAMHAUS_DBL: dict[str, Any] = {
    "name": "dbl.spamhaus.org",
    "kind": "domain",
    "description": "Spamhaus Domain Block List",
    "codes": {
        "127.0.1.2": {"meaning": "spam domain", "score": 6.0, "action": "reject"},
        "127.0.1.4": {"meaning": "phishing domain", "score": 8.0, "action": "reject"},
        "127.0.1.5": {"meaning": "malware domain", "score": 8.0, "action": "reject"},
        "127.0.1.6": {"meaning": "botnet command-and-control domain", "score": 8.0, "action": "reject"},
        "127.0.1.102": {"meaning": "abused legit domain: spam", "score": 2.0, "action": "junk"},
        "127.0.1.103": {"meaning": "abused legit domain: spammed redirector", "score": 2.0, "action": "junk"},
        "127.0.1.104": {"meaning": "abused legit domain: phishing", "score": 4.0, "action": "quarantine"},
        "127.0.1.105": {"meaning": "abused legit domain: malware", "score": 4.0, "action": "quarantine"},
        "127.0.1.106": {
            "meaning": "abused legit domain: botnet command-and-control",
            "score": 4.0,
            "action": "quarantine",
        },
    },
    "errors": {"127.0.1.255": "IP queries prohibited"},
}

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"spamhaus-zen": SPAMHAUS_ZEN, "spamhaus-dbl": SPAMHAUS_DBL}
)

_ZONE_KEYS = frozenset({"preset", "name", "kind", "codes", "default", "errors", "description"})
_CODE_KEYS = frozenset({"meaning", "score", "action"})


def parse_zone(data: Mapping[str, Any]) -> DnsblZone:
    """A `DnsblZone` from a plain dict, e.g. one config table.

    `{"preset": "spamhaus-zen", "name": "KEY.zen.dq.spamhaus.net"}` starts from
    a preset and overrides its keys. Raises DnsblConfigError naming the zone.
    """
    if not isinstance(data, Mapping):
        raise DnsblConfigError(f"dnsbl zone: expected a table, got {type(data).__name__}")
    label = str(data.get("name") or data.get("preset") or "?")
    if "preset" in data:
        preset = data["preset"]
        if preset not in PRESETS:
            raise DnsblConfigError(f"dnsbl zone {label!r}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        data = {**PRESETS[preset], **{k: v for k, v in data.items() if k != "preset"}}
        label = str(data.get("name") or label)

    def fail(problem: str) -> DnsblConfigError:
        return DnsblConfigError(f"dnsbl zone {label!r}: {problem}")

    unknown = set(data) - _ZONE_KEYS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail("'name' must be a non-empty string")
    name = _check_zone_name(name, fail)
    kind = data.get("kind")
    if kind not in ("ip", "domain"):
        raise fail(f"'kind' must be 'ip' or 'domain', not {kind!r}")
    if kind == "ip" and len(name) > 253 - 64:
        raise fail("name too long to hold an IPv6 query (32 nibbles) in front of it")
    codes_in = data.get("codes", {})
    if not isinstance(codes_in, Mapping):
        raise fail("'codes' must be a table of answer code -> {meaning, score, action}")
    codes = {_check_code(code, fail): _parse_code(value, f"code {code!r}", fail) for code, value in codes_in.items()}
    default = _UNKNOWN_CODE
    if data.get("default") is not None:
        default = _parse_code(data["default"], "'default'", fail)
    errors_in = data.get("errors", {})
    if not isinstance(errors_in, Mapping) or not all(isinstance(v, str) for v in errors_in.values()):
        raise fail("'errors' must be a table of answer code -> meaning")
    errors = {_check_code(code, fail): meaning for code, meaning in errors_in.items()}
    overlap = set(codes) & set(errors)
    if overlap:
        raise fail(f"code(s) {', '.join(sorted(overlap))} are both a listing and an error")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("'description' must be a string")
    return DnsblZone(name, kind, MappingProxyType(codes), default, MappingProxyType(errors), description)


def parse_zones(items: Iterable[Mapping[str, Any]]) -> list[DnsblZone]:
    zones = [parse_zone(item) for item in items]
    seen: set[str] = set()
    for zone in zones:
        if zone.name in seen:
            raise DnsblConfigError(f"dnsbl zone {zone.name!r}: listed twice")
        seen.add(zone.name)
    return zones


def _check_zone_name(name: str, fail: Any) -> str:
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        raise fail("'name' must be ASCII (IDNA-encode it)")
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253:
        raise fail("'name' must be a domain name with at least two labels, at most 253 characters")
    for lab in labels:
        if not lab or len(lab) > 63 or lab.startswith("-") or lab.endswith("-"):
            raise fail(f"'name' has an invalid label {lab!r}")
        if not all(c.isalnum() or c in "-_" for c in lab):
            raise fail(f"'name' label {lab!r} has characters DNS names cannot hold")
    return name


def _check_code(code: Any, fail: Any) -> str:
    if not isinstance(code, str):
        raise fail(f"answer code {code!r} must be written as a string, e.g. '127.0.0.2'")
    try:
        addr = ipaddress.IPv4Address(code)
    except (ipaddress.AddressValueError, ValueError):
        raise fail(f"answer code {code!r} is not an IPv4 address") from None
    if addr not in _LOOPBACK:
        raise fail(f"answer code {code} is outside 127.0.0.0/8 (RFC 5782 §2.1)")
    if addr in _ERROR_NET:
        raise fail(f"answer code {code} is in 127.255.255.0/24, which is reserved for errors")
    return str(addr)


def _parse_code(value: Any, where: str, fail: Any) -> ZoneCode:
    if not isinstance(value, Mapping):
        raise fail(f"{where}: expected a table with meaning, score, action")
    unknown = set(value) - _CODE_KEYS
    if unknown:
        raise fail(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    meaning = value.get("meaning")
    if not isinstance(meaning, str) or not meaning.strip():
        raise fail(f"{where}: 'meaning' must be a non-empty string")
    score = value.get("score", 0.0)
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise fail(f"{where}: 'score' must be a finite number, not {score!r}")
    action_name = value.get("action", "none")
    try:
        action = Action(action_name)
    except ValueError:
        choices = ", ".join(a.value for a in Action if a is not Action.TEMPFAIL)
        raise fail(f"{where}: 'action' must be one of {choices}, not {action_name!r}") from None
    if action is Action.TEMPFAIL:
        raise fail(f"{where}: 'action' cannot be tempfail (a listing is not a temporary condition)")
    return ZoneCode(meaning.strip(), float(score), action)


# ---- names ----------------------------------------------------------------------


def reversed_ip(ip: str) -> str:
    """The query prefix for an IP list: reversed octets, or 32 reversed nibbles for IPv6 (RFC 5782 §2.1, §2.4).

    An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 client) is queried as IPv4.
    Raises ValueError for anything that is not an IP address.
    """
    addr = ipaddress.ip_address(ip.strip().strip("[]"))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    suffix = ".in-addr.arpa" if addr.version == 4 else ".ip6.arpa"
    return addr.reverse_pointer.removesuffix(suffix)


# ---- sanity (RFC 5782 §5) ---------------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    sane: bool
    reason: str
    expires: float


# Per resolver: a different resolver (e.g. a public one) can get a different answer.
_SANITY: weakref.WeakKeyDictionary[Resolver, dict[str, _Verdict]] = weakref.WeakKeyDictionary()


async def zone_is_sane(
    zone: DnsblZone,
    resolver: Resolver,
    counter: QueryCounter | None = None,
    *,
    refresh: bool = False,
    max_age: float = SANITY_TTL,
) -> bool:
    """False if the zone lists its negative test entry (127.0.0.1, or INVALID for domain lists), i.e. everything.

    The verdict is cached per resolver for `max_age` seconds; `refresh=True`
    asks again (the pipeline's periodic probe). A DNS failure keeps the last
    verdict, or assumes sane if there is none: the lookups themselves will
    report the outage.
    """
    verdicts = _SANITY.setdefault(resolver, {})
    now = time.monotonic()
    known = verdicts.get(zone.name)
    if known is not None and not refresh and known.expires > now:
        return known.sane
    qname = f"{_NEGATIVE_TEST[zone.kind]}.{zone.name}"
    try:
        answer = await resolver.resolve(qname, "A", counter)
    except DnsTempError:
        return True if known is None else known.sane
    addrs = [r.address for r in answer.records]
    if addrs:
        reason = (
            f"{zone.name} answered {', '.join(addrs)} for its RFC 5782 negative test entry {qname}: it lists everything"
        )
        verdict = _Verdict(False, reason, now + max_age)
        if known is None or known.sane:
            log_event("dnsbl_insane", level=logging.ERROR, zone=zone.name, query=qname, answer=",".join(addrs))
    else:
        verdict = _Verdict(True, "", now + max_age)
    verdicts[zone.name] = verdict
    return verdict.sane


def _insanity_reason(zone: DnsblZone, resolver: Resolver) -> str:
    verdict = _SANITY.get(resolver, {}).get(zone.name)
    return verdict.reason if verdict is not None else f"{zone.name} lists everything"


# ---- lookups ----------------------------------------------------------------------


@dataclass
class _Outcome:
    """Everything one set of lookups found; becomes one CheckResult."""

    hits: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    temperrors: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


async def _lookup(
    subject: str,
    qname_prefix: str,
    zone: DnsblZone,
    resolver: Resolver,
    counter: QueryCounter,
    out: _Outcome,
    check: str,
) -> None:
    qname = f"{qname_prefix}.{zone.name}"
    try:
        answer = await resolver.resolve(qname, "A", counter)
    except DnsTempError as exc:
        out.temperrors.append({"zone": zone.name, "subject": subject, "query": qname, "reason": exc.reason})
        return
    except ValueError:
        # Too long for DNS once the zone is appended: nothing to ask. The name comes
        # from the sender, so this is not an error of ours to alert on.
        out.skipped.append({"zone": zone.name, "subject": subject, "query": qname})
        return
    if not answer.records:
        return  # NXDOMAIN or NODATA: not listed
    addrs = [r.address for r in answer.records]
    problems = [p for p in (_answer_problem(a, zone) for a in addrs) if p]
    if not problems and not await zone_is_sane(zone, resolver, counter):
        problems = [_insanity_reason(zone, resolver)]
    if problems:
        # One bad record makes the whole answer untrustworthy: no listing from it.
        for problem in problems:
            out.errors.append(
                {"zone": zone.name, "subject": subject, "query": qname, "answer": addrs, "problem": problem}
            )
            out.alerts.append(f"{zone.name}: {problem} (query {qname}); its answers are ignored until this is fixed")
        log_event(
            "dnsbl_error", level=logging.ERROR, check=check, zone=zone.name, query=qname,
            answer=",".join(addrs), problem="; ".join(problems),
        )  # fmt: skip
        return
    for addr in sorted(set(addrs), key=ipaddress.IPv4Address):
        code = zone.codes.get(addr, zone.default)
        out.hits.append(
            {
                "zone": zone.name,
                "subject": subject,
                "query": qname,
                "code": addr,
                "meaning": code.meaning,
                "score": code.score,
                "action": code.action.value,
            }
        )


def _answer_problem(addr: str, zone: DnsblZone) -> str | None:
    """Why an A record is not a listing, or None if it is one."""
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError:
        return f"answered {addr!r}, not an IPv4 address"
    if ip not in _LOOPBACK:
        # RFC 5782 §2.1: codes are in 127/8; anything else is usually a resolver rewriting NXDOMAIN.
        return f"answered {addr}, outside 127.0.0.0/8 (is the resolver rewriting NXDOMAIN?)"
    if ip in _ERROR_NET:
        meaning = _ERROR_MEANINGS.get(addr, "an error code")
        return f"answered {addr}: {meaning}"
    if addr in zone.errors:
        return f"answered {addr}: {zone.errors[addr]}"
    return None


def _result(
    check: str, subject_word: str, out: _Outcome, details: dict[str, Any], counter: QueryCounter, start: float
) -> CheckResult:
    details.update(hits=out.hits, errors=out.errors, temperrors=out.temperrors, alerts=out.alerts, skipped=out.skipped)
    elapsed = time.monotonic() - start
    if out.hits:
        score = sum(h["score"] for h in out.hits)
        action = max((Action(h["action"]) for h in out.hits), key=lambda a: a.severity)
        by_subject: dict[str, list[str]] = {}
        for h in out.hits:
            by_subject.setdefault(f"{h['subject']} is listed in {h['zone']}", []).append(f"{h['code']} {h['meaning']}")
        reason = "; ".join(f"{where} ({', '.join(what)})" for where, what in by_subject.items())
        return CheckResult(
            check, "listed", reason, action, score, details=details, elapsed=elapsed, dns_lookups=counter.lookups
        )
    if out.errors:
        zones = ", ".join(dict.fromkeys(e["zone"] for e in out.errors))
        reason = f"{zones} gave an unusable answer, ignored (not a listing): {out.errors[0]['problem']}"
        return CheckResult(check, "error", reason, details=details, elapsed=elapsed, dns_lookups=counter.lookups)
    if out.temperrors:
        zones = ", ".join(dict.fromkeys(t["zone"] for t in out.temperrors))
        reason = f"{zones} did not answer ({out.temperrors[0]['reason']}); not treated as a listing"
        return CheckResult(check, "temperror", reason, details=details, elapsed=elapsed, dns_lookups=counter.lookups)
    reason = f"{subject_word} not listed in {', '.join(details['zones'])}"
    return CheckResult(check, "clean", reason, details=details, elapsed=elapsed, dns_lookups=counter.lookups)


def _none(check: str, reason: str, details: dict[str, Any]) -> CheckResult:
    return CheckResult(check, "none", reason, details=details)


async def lookup_names(
    check: str,
    names: Sequence[str],
    zones: Iterable[DnsblZone],
    resolver: Resolver,
    details: dict[str, Any],
) -> CheckResult:
    """Query registrable domains against the domain zones (concurrently); shared with the URIBL body check."""
    start = time.monotonic()
    domain_zones = [z for z in zones if z.kind == "domain"]
    details["zones"] = [z.name for z in domain_zones]
    if not domain_zones:
        return _none(check, "no domain block lists configured", details)
    if not names:
        return _none(check, "no domain to look up", details)
    counter, out = QueryCounter(), _Outcome()
    await eager.gather(*(_lookup(n, n, z, resolver, counter, out, check) for n in names for z in domain_zones))
    return _result(check, ", ".join(names), out, details, counter, start)


async def check_ip(ip: str, zones: Iterable[DnsblZone], resolver: Resolver) -> CheckResult:
    """Look the connecting IP up in every IP zone (concurrently). Domain zones are skipped."""
    start = time.monotonic()
    ip_zones = [z for z in zones if z.kind == "ip"]
    details: dict[str, Any] = {"ip": ip, "zones": [z.name for z in ip_zones]}
    try:
        prefix = reversed_ip(ip)
    except ValueError:
        return _none("dnsbl", f"{ip!r} is not an IP address", details)
    if not ip_zones:
        return _none("dnsbl", "no IP block lists configured", details)
    counter, out = QueryCounter(), _Outcome()
    await eager.gather(*(_lookup(ip, prefix, z, resolver, counter, out, "dnsbl") for z in ip_zones))
    return _result("dnsbl", ip, out, details, counter, start)


async def check_domain(domain: str, zones: Iterable[DnsblZone], resolver: Resolver) -> CheckResult:
    """Look a HELO or MAIL FROM domain up (its registrable domain) in every domain zone.

    `domain` may be a whole address (the part after the last @ is used). An
    address literal, a bare name or a public suffix has nothing to look up:
    result "none".
    """
    raw = domain.rpartition("@")[2]
    details: dict[str, Any] = {"domain": raw}
    registrable = registrable_domain(raw)
    if registrable is None:
        return _none("dnsbl", f"{raw!r} has no registrable domain to look up", {**details, "zones": []})
    details["registrable"] = registrable
    return await lookup_names("dnsbl", [registrable], zones, resolver, details)
