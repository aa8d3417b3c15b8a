"""DMARC (RFC 7489): does the From domain's owner vouch for this message?

A message passes when SPF or DKIM passed for a domain *aligned* with the
RFC5322.From domain (§3.1): the same organisational domain in relaxed mode,
the same domain in strict mode. Otherwise the owner's published policy says
what to do with it: none, quarantine (our Junk folder) or reject (550 5.7.1).

Our own evaluator, not the `dmarc`/`authheaders` packages: those get
alignment wrong. The From domain comes from `checks.from_header.parse_author`,
which refuses every From header whose domain is ambiguous, so this module can
trust it. The organisational domain is the registrable domain of the Public
Suffix List (including its private section, as RFC 7489 §3.2 uses the whole
list).

Everything an aggregate report (§7.2) needs later is in `details`.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mailwarden.checks.from_header import normalize_domain
from mailwarden.checks.result import Action, CheckResult
from mailwarden.dns.public_suffix import organizational_domain
from mailwarden.dns.resolver import DnsTempError, QueryCounter, Resolver

POLICIES = ("none", "quarantine", "reject")
_NEXT_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}  # RFC 7489 §6.6.4
_ACTIONS = {"reject": Action.REJECT, "quarantine": Action.JUNK, "none": Action.NONE}


@dataclass(frozen=True)
class SpfIdentity:
    """The SPF verdict DMARC may use: for MAIL FROM's domain, or HELO's when MAIL FROM was null."""

    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    domain: str
    scope: str = "mfrom"  # "mfrom" or "helo", as aggregate reports name it


@dataclass(frozen=True)
class DkimIdentity:
    """One DKIM signature's verdict and its d= domain."""

    result: str  # pass, fail, neutral, none, temperror, permerror, policy
    domain: str
    selector: str = ""


@dataclass(frozen=True)
class ReportUri:
    uri: str
    max_size: int | None = None  # bytes, from a "!10m" suffix (RFC 7489 §6.4)


@dataclass(frozen=True)
class DmarcRecord:
    """A parsed `v=DMARC1` record (RFC 7489 §6.3). `p` is None when missing or invalid."""

    raw: str
    p: str | None
    sp: str | None  # as published; None means "same as p"
    sp_invalid: bool = False
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[ReportUri, ...] = ()
    ruf: tuple[ReportUri, ...] = ()
    fo: tuple[str, ...] = ("0",)
    rf: tuple[str, ...] = ("afrf",)
    ri: int = 86400
    problems: tuple[str, ...] = ()  # tags discarded for bad syntax


# ---- the record (RFC 7489 §6.3, §6.4) ---------------------------------------------------

_VERSION_RE = re.compile(r"[vV][ \t]*=[ \t]*DMARC1")  # "DMARC1" is case-sensitive in the §6.4 ABNF
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s,!;]+")
_SIZE_RE = re.compile(r"(\d+)([kmgt]?)", re.IGNORECASE)
_KEYWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def is_dmarc_record(text: str) -> bool:
    """RFC 7489 §6.6.3 step 2: records not starting with v=DMARC1 are discarded."""
    return bool(_VERSION_RE.fullmatch(text.split(";", 1)[0].strip(" \t")))


def parse_dmarc_record(text: str) -> DmarcRecord | None:
    """The record's tags; None if it is not a DMARC record at all.

    Unknown tags are ignored and a syntax error in an optional tag falls back
    to its default (§6.3); whether a bad `p` voids the record is the caller's
    decision (§6.6.3 step 5).
    """
    if not is_dmarc_record(text):
        return None
    values: dict[str, str] = {}
    problems: list[str] = []
    for part in text.split(";")[1:]:
        part = part.strip(" \t")
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip(" \t").lower()
        if not eq or not name:
            problems.append(f"not a tag: {part!r}")
        elif name in values:
            problems.append(f"duplicate {name}= ignored")
        else:
            values[name] = value.strip(" \t")

    def policy(tag: str) -> str | None:
        value = values.get(tag)
        if value is None:
            return None
        if value.lower() in POLICIES:
            return value.lower()
        problems.append(f"invalid {tag}={value!r}")
        return None

    p = policy("p")
    sp = policy("sp")
    record = DmarcRecord(raw=text, p=p, sp=sp, sp_invalid="sp" in values and sp is None)
    changes: dict[str, Any] = {}
    if "pct" in values:
        pct = values["pct"]
        if pct.isdigit() and int(pct) <= 100:
            changes["pct"] = int(pct)
        else:
            problems.append(f"invalid pct={pct!r}")
    for tag in ("adkim", "aspf"):
        if tag in values:
            if values[tag].lower() in ("r", "s"):
                changes[tag] = values[tag].lower()
            else:
                problems.append(f"invalid {tag}={values[tag]!r}")
    for tag in ("rua", "ruf"):
        if tag in values:
            changes[tag] = _report_uris(tag, values[tag], problems)
    if "fo" in values:
        fo = tuple(x.strip(" \t") for x in values["fo"].split(":"))
        if all(x in ("0", "1", "d", "s") for x in fo):
            changes["fo"] = fo
        else:
            problems.append(f"invalid fo={values['fo']!r}")
    if "rf" in values:
        rf = tuple(x.strip(" \t").lower() for x in values["rf"].split(":"))
        if all(_KEYWORD_RE.fullmatch(x) for x in rf):
            changes["rf"] = rf
        else:
            problems.append(f"invalid rf={values['rf']!r}")
    if "ri" in values:
        ri = values["ri"]
        if ri.isdigit() and int(ri) < 2**32:
            changes["ri"] = int(ri)
        else:
            problems.append(f"invalid ri={ri!r}")
    return replace(record, **changes, problems=tuple(problems))


def _report_uris(tag: str, value: str, problems: list[str]) -> tuple[ReportUri, ...]:
    out: list[ReportUri] = []
    for item in value.split(","):
        item = item.strip(" \t")
        uri, bang, size = item.rpartition("!")
        if not bang:
            uri, size = item, ""
        m = _SIZE_RE.fullmatch(size) if size else None
        if (bang and not m) or not _URI_RE.fullmatch(uri):
            problems.append(f"invalid {tag} URI {item!r}")
            continue
        out.append(ReportUri(uri, int(m.group(1)) * _UNITS[m.group(2).lower()] if m else None))
    return tuple(out)


# ---- evaluation ------------------------------------------------------------------------


@dataclass
class _Found:
    domain: str  # where the record was found (without _dmarc.)
    records: list[str] = field(default_factory=list)


async def _discover(domain: str, org: str, resolver: Resolver, counter: QueryCounter) -> _Found | None:
    """RFC 7489 §6.6.3 steps 1-4: the From domain's DMARC records, else the organisational domain's."""
    for candidate in dict.fromkeys((domain, org)):
        try:
            texts = await resolver.txt(f"_dmarc.{candidate}", counter)
        except ValueError:
            texts = []  # a name DNS cannot carry has no record
        records = [t for t in texts if is_dmarc_record(t)]
        if records:
            return _Found(candidate, records)
    return None


def _aligned(identity: str, from_domain: str, from_org: str, mode: str) -> bool:
    """RFC 7489 §3.1.1/§3.1.2: strict is the same domain, relaxed the same organisational domain."""
    try:
        identity = normalize_domain(identity)
    except ValueError:
        return False
    if mode == "s":
        return identity == from_domain
    return organizational_domain(identity) == from_org


async def evaluate_dmarc(
    from_domain: str,
    spf: SpfIdentity | None,
    dkim: Sequence[DkimIdentity],
    resolver: Resolver,
    *,
    rng: Callable[[], float] = random.random,
) -> CheckResult:
    """The DMARC verdict and suggested action for a message from `from_domain`."""
    started = time.monotonic()
    counter = QueryCounter()

    def done(
        result: str,
        reason: str,
        details: dict[str, Any],
        *,
        policy: str = "none",
        disposition: str = "none",
        action: Action = Action.NONE,
    ) -> CheckResult:
        details.setdefault("disposition", disposition)
        return CheckResult(
            check="dmarc",
            result=result,
            reason=reason,
            action=action,
            auth_results=(
                f"dmarc={result} (p={policy} dis={disposition})" + (f" header.from={shown}" if shown else ""),
            ),
            details=details,
            elapsed=time.monotonic() - started,
            dns_lookups=counter.lookups,
        )

    shown = ""  # only a valid domain goes into the header: this one is not
    try:
        domain = normalize_domain(from_domain)
    except ValueError as exc:
        return done("permerror", f"DMARC cannot evaluate From domain: {exc}", {"header_from": from_domain})
    shown = domain
    org = organizational_domain(domain)
    details: dict[str, Any] = {"header_from": domain, "org_domain": org}

    try:
        found = await _discover(domain, org, resolver, counter)
    except DnsTempError as exc:
        details["dns_error"] = str(exc)
        return done(
            "temperror", f"DMARC record lookup failed temporarily: {exc.reason}", details, action=Action.TEMPFAIL
        )
    if found is None:
        where = domain if org == domain else f"{domain} or {org}"
        return done("none", f"no DMARC record for {where}", details)
    details["record_domain"] = found.domain
    if len(found.records) > 1:
        # §6.6.3 step 4: several records mean no policy; no fallback to the organisational domain.
        details["records"] = found.records
        return done("none", f"{len(found.records)} DMARC records at _dmarc.{found.domain}: none applied", details)

    record = parse_dmarc_record(found.records[0])
    assert record is not None  # _discover kept only DMARC records
    p, sp = record.p, record.sp or record.p
    notes = list(record.problems)
    if p is None or record.sp_invalid:
        if not record.rua:
            details["record"] = record.raw
            details["problems"] = notes
            return done(
                "permerror", f"DMARC record at _dmarc.{found.domain} has no valid policy: {'; '.join(notes)}", details
            )
        # §6.6.3 step 5: a record with a bad policy but a report address acts as p=none.
        p = sp = "none"
        notes.append("no valid policy but rua present: treated as p=none")

    subdomain_record = found.domain == org and domain != org
    policy, policy_tag = (sp, "sp") if subdomain_record else (p, "p")
    assert policy is not None
    details.update(
        policy_published={
            "domain": found.domain,
            "p": p,
            "sp": sp,
            "pct": record.pct,
            "adkim": record.adkim,
            "aspf": record.aspf,
            "fo": ":".join(record.fo),
            "rf": ":".join(record.rf),
            "ri": record.ri,
        },
        record=record.raw,
        rua=[u.uri for u in record.rua],
        ruf=[u.uri for u in record.ruf],
        report_uris={"rua": [asdict(u) for u in record.rua], "ruf": [asdict(u) for u in record.ruf]},
        problems=notes,
        policy=policy,
        policy_tag=policy_tag,
    )

    dkim_rows = [
        {
            "domain": d.domain.lower(),
            "selector": d.selector,
            "result": d.result.lower(),
            "aligned": d.result.lower() == "pass" and _aligned(d.domain, domain, org, record.adkim),
        }
        for d in dkim
    ]
    spf_row = {
        "domain": spf.domain.lower() if spf else "",
        "scope": spf.scope if spf else "mfrom",
        "result": spf.result.lower() if spf else "none",
        "aligned": bool(spf and spf.result.lower() == "pass" and _aligned(spf.domain, domain, org, record.aspf)),
    }
    dkim_ok = any(row["aligned"] for row in dkim_rows)
    spf_ok = spf_row["aligned"]
    details.update(
        dkim=dkim_rows,
        spf=spf_row,
        dkim_aligned="pass" if dkim_ok else "fail",
        spf_aligned="pass" if spf_ok else "fail",
    )
    evidence = _evidence(dkim_rows, spf_row, record)

    if dkim_ok or spf_ok:
        details.update(pct_applied=True, override_reason=None)
        return done("pass", f"DMARC pass for {domain}: {evidence}", details, policy=policy)

    # §6.6.4: pct samples which failing messages get the policy; the rest get the next lower one.
    sampled = policy == "none" or record.pct >= 100 or rng() * 100 < record.pct
    disposition = policy if sampled else _NEXT_LOWER[policy]
    details.update(pct_applied=sampled, override_reason=None if sampled else "sampled_out")
    applied = f"{policy_tag}={policy}" + ("" if sampled else f" not sampled (pct={record.pct})")
    return done(
        "fail",
        f"DMARC fail for {domain}: {evidence}; policy {applied} from _dmarc.{found.domain}: {disposition}",
        details,
        policy=policy,
        disposition=disposition,
        action=_ACTIONS[disposition],
    )


def _evidence(dkim_rows: list[dict[str, Any]], spf_row: dict[str, Any], record: DmarcRecord) -> str:
    """Which identifiers aligned, in words: 'DKIM d=a.test pass, aligned (adkim=r); SPF ...'."""
    parts = []
    for row in dkim_rows:
        state = "aligned" if row["aligned"] else "not aligned" if row["result"] == "pass" else "does not count"
        parts.append(f"DKIM d={row['domain']} {row['result']}, {state} (adkim={record.adkim})")
    if not dkim_rows:
        parts.append("no DKIM signature")
    if spf_row["domain"]:
        state = "aligned" if spf_row["aligned"] else "not aligned" if spf_row["result"] == "pass" else "does not count"
        parts.append(f"SPF {spf_row['scope']}={spf_row['domain']} {spf_row['result']}, {state} (aspf={record.aspf})")
    else:
        parts.append("no SPF identity")
    return "; ".join(parts)
