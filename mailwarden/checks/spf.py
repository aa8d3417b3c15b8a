"""SPF (RFC 7208): our own check_host() and the check the pipeline runs.

`check_host` is the function of RFC 7208 §4: it fetches the domain's
v=spf1 TXT record, parses all of it (a syntax error anywhere is a permerror,
§4.6), then evaluates mechanisms left to right, following include and
redirect, until one matches. `evaluate_spf` picks the identity (MAIL FROM,
or postmaster@HELO for the null reverse-path, §2.4) and returns our
`CheckResult`.

Limits are enforced where the RFC puts them, before DNS is asked:

* at most 10 terms that cause DNS lookups (include, a, mx, ptr, exists,
  redirect) per check, counted across includes and redirects; the 11th is a
  permerror before its query is sent (§4.6.4), which is also what ends
  include and redirect loops;
* at most 2 void lookups (NXDOMAIN or no records): the third is a permerror
  at once, so nothing is asked after it (§4.6.4);
* at most 10 MX names per mx mechanism (more is a permerror, before any
  address is looked up) and 10 PTR names per ptr mechanism or %{p} macro
  (the rest are ignored) (§4.6.4);
* the whole evaluation is bounded in time (20 s by default, §4.6.4); running
  out is a temperror.

Names that DNS cannot carry (the resolver raises ValueError) are treated as
names that do not exist: for the checked domain that is "none" (§4.3), for
include and redirect targets "none" and therefore permerror (§5.2, §6.1),
for a, mx, ptr and exists a mechanism that does not match (§4.8, §5), and
for exp= no explanation (§6.2).

Only TXT records are consulted: RFC 7208 §3.1 and §14.1 retired the SPF RR
type (99).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import dns.name

from mailwarden.checks.result import CheckResult
from mailwarden.dns import eager
from mailwarden.dns.resolver import DnsResult, DnsTempError, QueryCounter, Resolver

MAX_DNS_TERMS = 10  # RFC 7208 §4.6.4
MAX_VOID_LOOKUPS = 2  # RFC 7208 §4.6.4, the RECOMMENDED default
MAX_MX_NAMES = 10  # RFC 7208 §4.6.4
MAX_PTR_NAMES = 10  # RFC 7208 §4.6.4
DEFAULT_TIMEOUT = 20.0  # RFC 7208 §4.6.4: "SHOULD allow at least 20 seconds"

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SpfResult:
    """What check_host() found, with enough detail to explain it."""

    result: str  # one of RESULTS
    domain: str  # the <domain> check_host() started from
    reason: str  # for an administrator: which mechanism matched, or what went wrong
    explanation: str | None = None  # RFC 7208 §6.2, only for "fail", only from the domain's exp=
    path: tuple[tuple[str, str], ...] = ()  # (domain, term) from the checked domain down to the matching mechanism
    lookups: int = 0  # terms that caused DNS lookups, against the limit of 10 (§4.6.4)
    void_lookups: int = 0  # against the limit of 2 (§4.6.4)
    queries: int = 0  # every lookup asked of the resolver, including exp= and address validation

    @property
    def mechanism(self) -> str | None:
        """The mechanism that decided the result, as published (e.g. "-all"), if one did."""
        for _domain, term in reversed(self.path):
            if not term.lower().startswith("redirect="):
                return term
        return None


# ---- parsing (RFC 7208 §4.5, §4.6, §5, §6, §7.1) ------------------------------------------------------------

_DOMAIN_LETTERS = frozenset("slodipvh")
_ALL_LETTERS = frozenset("slodipvhcrt")  # c, r and t only in explanation text (§7.1)
_DELIMITERS = ".-+,/_="  # §7.1 delimiter

_MACRO_EXPAND = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")  # §7.1 toplabel
_NUMBER = r"(0|[1-9][0-9]*)"  # a CIDR length; leading zeros are not allowed, as in ip4-network
_DUAL_CIDR = re.compile(rf"(?:/{_NUMBER})?(?://{_NUMBER})?")
_SPEC_AND_DUAL_CIDR = re.compile(rf"(.*?)(?:/{_NUMBER})?(?://{_NUMBER})?", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4_NETWORK = re.compile(rf"({_QNUM}(?:\.{_QNUM}){{3}})(?:/{_NUMBER})?")  # §5.6 ip4-network
_IP6_NETWORK = re.compile(rf"([0-9A-Fa-f:.]+)(?:/{_NUMBER})?")
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)", re.S)  # §4.6.1 name "=" macro-string
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


@dataclass(frozen=True)
class _Macro:
    letter: str  # lower case
    url_escape: bool  # the letter was upper case (§7.3)
    keep: int  # right-hand parts to keep; 0 for all
    reverse: bool
    delimiters: str


MacroString = tuple[str | _Macro, ...]


@dataclass(frozen=True)
class _Mechanism:
    qualifier: str
    name: str  # all include a mx ptr ip4 ip6 exists
    text: str  # the term as published, for reasons
    spec: MacroString | None = None  # domain-spec; None means <domain>
    cidr4: int = 32
    cidr6: int = 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@dataclass(frozen=True)
class _Record:
    mechanisms: tuple[_Mechanism, ...]
    redirect: MacroString | None
    redirect_text: str
    exp: MacroString | None


class _PermError(Exception):
    pass


class _SyntaxError(_PermError):
    pass


def _parse_macro_string(text: str, letters: frozenset[str], *, spaces: bool = False) -> tuple[MacroString, bool]:
    """Tokens of a macro-string (§7.1), and whether it ends with a macro-expand; _SyntaxError if malformed."""
    tokens: list[str | _Macro] = []
    literal: list[str] = []
    ends_with_macro = False
    i = 0
    while i < len(text):
        ch = text[i]
        ends_with_macro = False
        if ch == "%":
            nxt = text[i + 1 : i + 2]
            if nxt in ("%", "_", "-"):
                literal.append({"%": "%", "_": " ", "-": "%20"}[nxt])  # §7.1
                ends_with_macro = True
                i += 2
                continue
            m = _MACRO_EXPAND.match(text, i)
            if m is None:
                raise _SyntaxError(f"bad macro at {text[i : i + 8]!r} (RFC 7208 §7.1)")
            letter = m.group(1).lower()
            if letter not in letters:
                where = "a domain-spec" if "c" not in letters else "a macro-string"
                raise _SyntaxError(f"macro letter {m.group(1)!r} is not allowed in {where} (RFC 7208 §7.1)")
            keep = int(m.group(2)) if m.group(2) else 0
            if m.group(2) and keep == 0:
                raise _SyntaxError(f"{m.group(0)!r}: the number of parts must be nonzero (RFC 7208 §7.3)")
            if literal:
                tokens.append("".join(literal))
                literal = []
            tokens.append(_Macro(letter, m.group(1).isupper(), keep, bool(m.group(3)), m.group(4)))
            ends_with_macro = True
            i = m.end()
            continue
        if "\x21" <= ch <= "\x7e" or (spaces and ch == " "):  # macro-literal: visible US-ASCII except %
            literal.append(ch)
            i += 1
            continue
        raise _SyntaxError(f"character {ch!r} is not allowed in {text!r} (RFC 7208 §7.1)")
    if literal:
        tokens.append("".join(literal))
    return tuple(tokens), ends_with_macro


def _parse_domain_spec(text: str) -> MacroString:
    """§7.1: domain-spec = macro-string domain-end; domain-end = ( "." toplabel [ "." ] ) / macro-expand."""
    if not text:
        raise _SyntaxError("empty domain-spec (RFC 7208 §7.1)")
    tokens, ends_with_macro = _parse_macro_string(text, _DOMAIN_LETTERS)
    if not ends_with_macro:
        tail = text[:-1] if text.endswith(".") else text
        _head, dot, top = tail.rpartition(".")
        if not dot or not _TOPLABEL.fullmatch(top):
            raise _SyntaxError(f"{text!r} does not end in a valid top label (RFC 7208 §7.1)")
    return tokens


def _parse_mechanism(term: str) -> _Mechanism:
    m = _MECHANISM.fullmatch(term)
    if m is None:
        raise _SyntaxError(f"unknown term {term!r} (RFC 7208 §4.6.1)")
    qualifier, name, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if name == "all":  # §5.1
        if rest:
            raise _SyntaxError(f"{term!r}: all takes no argument (RFC 7208 §5.1)")
        return _Mechanism(qualifier, name, term)
    if name in ("include", "exists"):  # §5.2, §5.7
        if not rest.startswith(":"):
            raise _SyntaxError(f"{term!r}: {name} needs ':' and a domain (RFC 7208 §5)")
        return _Mechanism(qualifier, name, term, spec=_parse_domain_spec(rest[1:]))
    if name == "ptr":  # §5.5
        if not rest:
            return _Mechanism(qualifier, name, term)
        if not rest.startswith(":"):
            raise _SyntaxError(f"{term!r}: ptr takes only ':' and a domain (RFC 7208 §5.5)")
        return _Mechanism(qualifier, name, term, spec=_parse_domain_spec(rest[1:]))
    if name in ("a", "mx"):  # §5.3, §5.4: [ ":" domain-spec ] [ dual-cidr-length ]
        spec: MacroString | None = None
        if rest.startswith(":"):
            c = _SPEC_AND_DUAL_CIDR.fullmatch(rest[1:])
            assert c is not None  # the lazy spec group can always take everything
            spec = _parse_domain_spec(c.group(1))
            cidr4, cidr6 = c.group(2), c.group(3)
        else:
            c = _DUAL_CIDR.fullmatch(rest)
            if c is None:
                raise _SyntaxError(f"{term!r}: bad argument for {name} (RFC 7208 §5)")
            cidr4, cidr6 = c.group(1), c.group(2)
        v4 = 32 if cidr4 is None else int(cidr4)
        v6 = 128 if cidr6 is None else int(cidr6)
        if v4 > 32 or v6 > 128:
            raise _SyntaxError(f"{term!r}: CIDR length out of range (RFC 7208 §5.6)")
        return _Mechanism(qualifier, name, term, spec=spec, cidr4=v4, cidr6=v6)
    if name == "ip4":  # §5.6
        c = _IP4_NETWORK.fullmatch(rest[1:]) if rest.startswith(":") else None
        if c is None or int(c.group(2) or 32) > 32:
            raise _SyntaxError(f"{term!r}: not an IPv4 network (RFC 7208 §5.6)")
        return _Mechanism(
            qualifier, name, term, network=ipaddress.IPv4Network(f"{c.group(1)}/{c.group(2) or 32}", False)
        )
    if name == "ip6":  # §5.6
        c = _IP6_NETWORK.fullmatch(rest[1:]) if rest.startswith(":") else None
        try:
            if c is None or int(c.group(2) or 128) > 128:
                raise ValueError
            network = ipaddress.IPv6Network(f"{c.group(1)}/{c.group(2) or 128}", False)
        except ValueError:
            raise _SyntaxError(f"{term!r}: not an IPv6 network (RFC 7208 §5.6)") from None
        return _Mechanism(qualifier, name, term, network=network)
    raise _SyntaxError(f"unknown mechanism {term!r} (RFC 7208 §4.6.1)")


def _is_spf_record(text: str) -> bool:
    """§4.5: exactly "v=spf1" (case-insensitively), then a space or the end."""
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


@functools.lru_cache(maxsize=4096)
def _parse_record(text: str) -> _Record:
    """The whole record, so that a syntax error anywhere is found before anything is evaluated (§4.6).

    Cached by text: records repeat across messages, the result is immutable, errors are not cached."""
    mechanisms: list[_Mechanism] = []
    redirect: MacroString | None = None
    redirect_text = ""
    exp: MacroString | None = None
    seen: set[str] = set()
    for term in text[6:].split(" "):  # §4.6.1: terms are separated by one or more SP, nothing else
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        if modifier is None:
            mechanisms.append(_parse_mechanism(term))
            continue
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            if name in seen:  # §6: each at most once
                raise _SyntaxError(f"{name}= appears more than once (RFC 7208 §6)")
            seen.add(name)
            if name == "redirect":  # §6.1
                redirect, redirect_text = _parse_domain_spec(value), term
            else:  # §6.2: exp = "exp" "=" domain-spec, so an empty exp= is a syntax error, as the errata agree
                exp = _parse_domain_spec(value)
        else:  # §6: unknown modifiers are ignored, but must still be well formed
            _parse_macro_string(value, _ALL_LETTERS)
    return _Record(tuple(mechanisms), redirect, redirect_text, exp)


# ---- evaluation (RFC 7208 §4.6, §5, §6, §7) -------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    result: str
    domain: str  # the domain whose record decided
    path: tuple[tuple[str, str], ...] = ()
    explanation: str | None = None
    no_record: str | None = None  # why the result is "none"


@dataclass
class _Evaluation:
    """State shared by one check_host() call and every include and redirect under it."""

    ip: Address
    sender: str
    local: str
    sender_domain: str
    helo: str
    receiver: str
    resolver: Resolver
    counter: QueryCounter = field(default_factory=QueryCounter)
    terms: int = 0
    voids: int = 0
    _ptr_names: list[str] | None = None
    deadline: float = float("inf")  # time.monotonic() by which the whole evaluation must end (§4.6.4)

    async def resolve(self, name: str, rdtype: str) -> DnsResult:
        """Every query of the evaluation, within its overall time limit (TimeoutError past it).

        The limit is ours, not an `asyncio.timeout` around the evaluation: that binds to
        the task that entered it, and the pipeline starts checks eagerly (dns/eager.py), so
        the task that finishes an evaluation need not be the one that started it.
        A cached answer needs no timer.
        """
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if self.resolver.has_answer(name, rdtype):
            return await self.resolver.resolve(name, rdtype, self.counter)
        return await asyncio.wait_for(self.resolver.resolve(name, rdtype, self.counter), remaining)

    @property
    def rdtype(self) -> str:
        return "A" if self.ip.version == 4 else "AAAA"

    def charge_term(self, domain: str, term: str) -> None:
        """§4.6.4: count a term that causes DNS lookups before any of its queries is sent."""
        self.terms += 1
        if self.terms > MAX_DNS_TERMS:
            raise _PermError(
                f"{term!r} in {domain} would be DNS-querying term number {self.terms}; "
                f"the limit is {MAX_DNS_TERMS} (RFC 7208 §4.6.4)"
            )

    async def lookup(self, name: str, rdtype: str, *, void_counts: bool = True) -> DnsResult | None:
        """A query for a mechanism; None if DNS cannot carry the name (treated as non-existent, §4.8)."""
        try:
            result = await self.resolve(name, rdtype)
        except ValueError:
            return None
        if not result.records and void_counts:
            self.voids += 1
            if self.voids > MAX_VOID_LOOKUPS:  # §4.6.4: raised at once, so no query follows the third void lookup
                raise _PermError(
                    f"{name}/{rdtype} is void lookup number {self.voids}; the limit is {MAX_VOID_LOOKUPS} "
                    "(RFC 7208 §4.6.4)"
                )
        return result

    async def check(self, domain: str, *, want_exp: bool) -> _Outcome:
        """check_host() for <domain> (§4), sharing limits with the caller."""
        try:
            answer = await self.resolve(domain, "TXT")
        except ValueError:
            return _Outcome(
                "none", domain, no_record=f"{domain!r} is not a domain name DNS can look up (RFC 7208 §4.3)"
            )
        # §4.5: keep only v=spf1 records; more than one is a permerror
        records = [t for t in answer.texts() if _is_spf_record(t)]
        if not records:
            why = "does not exist" if answer.nxdomain else "publishes no SPF record"
            return _Outcome("none", domain, no_record=f"{domain} {why}")
        if len(records) > 1:
            raise _PermError(f"{domain} publishes {len(records)} SPF records (RFC 7208 §4.5)")
        try:
            record = _parse_record(records[0])
        except _SyntaxError as exc:
            raise _PermError(f"syntax error in the SPF record of {domain}: {exc}") from None

        for mechanism in record.mechanisms:  # §4.6.2: left to right, the first match wins
            via = await self.match(mechanism, domain)
            if via is None:
                continue
            result = _QUALIFIERS[mechanism.qualifier]
            explanation = None
            if result == "fail" and want_exp and record.exp is not None:
                explanation = await self.explain(record.exp, domain)
            return _Outcome(result, domain, ((domain, mechanism.text), *via), explanation)

        if record.redirect is not None:  # §6.1: only when no mechanism matched
            self.charge_term(domain, record.redirect_text)
            target = await self.target(record.redirect, domain)
            outcome = await self.check(target, want_exp=want_exp)
            if outcome.result == "none":
                raise _PermError(f"{record.redirect_text} in {domain}: {outcome.no_record} (RFC 7208 §6.1)")
            path = ((domain, record.redirect_text), *outcome.path)
            return _Outcome(outcome.result, outcome.domain, path, outcome.explanation)
        return _Outcome("neutral", domain)  # §4.7

    async def match(self, mech: _Mechanism, domain: str) -> tuple[tuple[str, str], ...] | None:
        """None if the mechanism does not match; else the path below it (non-empty only for include)."""
        if mech.name == "all":
            return ()
        if mech.name in ("ip4", "ip6"):  # §5.6; an IPv4-mapped client was already made IPv4 (§5)
            assert mech.network is not None
            return () if self.ip.version == mech.network.version and self.ip in mech.network else None

        self.charge_term(domain, mech.text)
        name = domain if mech.spec is None else await self.target(mech.spec, domain)

        if mech.name == "include":  # §5.2
            outcome = await self.check(name, want_exp=False)  # §6.2: the included record's exp= is not used
            if outcome.result == "none":
                raise _PermError(f"{mech.text} in {domain}: {outcome.no_record} (RFC 7208 §5.2)")
            return outcome.path if outcome.result == "pass" else None
        if mech.name == "exists":  # §5.7: always an A query, whatever the client's address family
            answer = await self.lookup(name, "A")
            return () if answer is not None and answer.records else None
        if mech.name == "a":  # §5.3
            answer = await self.lookup(name, self.rdtype)
            return () if answer is not None and self.in_any(answer.records, mech) else None
        if mech.name == "mx":  # §5.4
            answer = await self.lookup(name, "MX")
            if answer is None or not answer.records:
                return None
            if len(answer.records) > MAX_MX_NAMES:  # §4.6.4, before any address is asked for
                raise _PermError(
                    f"{mech.text} in {domain}: {name} has {len(answer.records)} MX records; "
                    f"the limit is {MAX_MX_NAMES} (RFC 7208 §4.6.4)"
                )
            ordered = sorted(answer.records, key=lambda r: r.preference)
            hosts = [_name_text(r.exchange) for r in ordered if r.exchange != dns.name.root]  # RFC 7505 null MX
            for found in await self.addresses(hosts):  # in order, so the outcome is that of asking one by one
                if isinstance(found, DnsTempError):
                    raise found
                if self.in_any(found, mech):
                    return ()
            return None
        # ptr, §5.5 (its use is discouraged, but it must work)
        names = await self.ptr_names(void_counts=True)
        candidates = [n for n in names if _within(n, name)]
        for found in await self.addresses(candidates):
            if not isinstance(found, DnsTempError) and self.is_self(found):  # §5.5: DNS errors skip the name
                return ()
        return None

    async def target(self, spec: MacroString, domain: str) -> str:
        """§4.8 and §7.3: expand a domain-spec into the name to query."""
        name = await self.expand(spec, domain)
        if name.endswith("."):
            name = name[:-1]
        while len(name) > 253 and "." in name:  # §7.3: truncate from the left, label by label
            name = name.split(".", 1)[1]
        return name

    async def addresses(self, names: list[str]) -> list[Any]:
        """The client's address family's records for each name, concurrently, in order; errors as values."""

        async def one(name: str) -> Any:
            try:
                return (await self.resolve(name, self.rdtype)).records
            except ValueError:
                return ()
            except DnsTempError as exc:
                return exc

        return list(await eager.gather(*(one(n) for n in names)))

    def in_any(self, records: Any, mech: _Mechanism) -> bool:
        length = mech.cidr4 if self.ip.version == 4 else mech.cidr6
        for r in records:
            try:
                network = ipaddress.ip_network(f"{r.address}/{length}", strict=False)
            except ValueError:
                continue
            if self.ip.version == network.version and self.ip in network:
                return True
        return False

    def is_self(self, records: Any) -> bool:
        for r in records:
            try:
                if ipaddress.ip_address(r.address) == self.ip:
                    return True
            except ValueError:
                continue
        return False

    async def ptr_names(self, *, void_counts: bool) -> list[str]:
        """The first 10 names the client's address points to (§4.6.4, §5.5); a DNS error means none."""
        try:
            answer = await self.lookup(self.ip.reverse_pointer, "PTR", void_counts=void_counts)
        except DnsTempError:
            return []  # §5.5: "If a DNS error occurs while doing the PTR RR lookup, then this mechanism fails"
        if answer is None:
            return []
        return [_name_text(r.target) for r in answer.records][:MAX_PTR_NAMES]

    async def validated_name(self, domain: str) -> str:
        """§7.3 %{p}: a validated name of the client, preferring <domain> and its subdomains."""
        if self._ptr_names is None:
            names = await self.ptr_names(void_counts=False)
            found = await self.addresses(names)
            self._ptr_names = [
                n for n, f in zip(names, found, strict=True) if not isinstance(f, DnsTempError) and self.is_self(f)
            ]
        validated = self._ptr_names
        for n in validated:
            if n == domain:
                return n
        for n in validated:
            if _within(n, domain):
                return n
        return validated[0] if validated else "unknown"

    async def expand(self, tokens: MacroString, domain: str) -> str:
        """§7.3 macro expansion."""
        out: list[str] = []
        for token in tokens:
            if isinstance(token, str):
                out.append(token)
                continue
            value = await self.macro_value(token.letter, domain)
            parts = re.split("[" + re.escape(token.delimiters or ".") + "]", value)
            if token.reverse:
                parts.reverse()
            if token.keep:
                parts = parts[-token.keep :]
            value = ".".join(parts)
            if token.url_escape:  # §7.3: upper-case macros are URL-escaped (RFC 3986 unreserved kept)
                value = urllib.parse.quote(value, safe="")
            out.append(value)
        return "".join(out)

    async def macro_value(self, letter: str, domain: str) -> str:
        ip = self.ip
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":  # §7.3: dotted quad, or dot-separated nibbles for IPv6 (upper case, as in §7.4)
            if ip.version == 4:
                return str(ip)
            return ".".join(f"{ip.packed.hex():0>32}".upper())
        if letter == "p":
            return await self.validated_name(domain)
        if letter == "v":
            return "in-addr" if ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":  # §7.3: for humans; RFC 5952 form for IPv6
            return str(ip)
        if letter == "r":
            return self.receiver
        if letter == "t":
            return str(int(time.time()))
        raise AssertionError(letter)  # the parser admits no other letter

    async def explain(self, spec: MacroString, domain: str) -> str | None:
        """§6.2: the explanation for a fail; any problem means there is none. Not counted against limits."""
        try:
            name = await self.target(spec, domain)
            answer = await self.resolve(name, "TXT")
        except (DnsTempError, ValueError):
            return None
        texts = answer.texts()
        if len(texts) != 1:
            return None
        try:
            tokens, _ = _parse_macro_string(texts[0], _ALL_LETTERS, spaces=True)  # explain-string, US-ASCII only
            explanation = await self.expand(tokens, domain)
        except (_PermError, DnsTempError):
            return None
        return explanation if explanation.isascii() and explanation.isprintable() else None


def _name_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _within(name: str, domain: str) -> bool:
    """name is domain or a subdomain of it (case-insensitively)."""
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


def _client_address(ip: str | Address) -> Address:
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # §5: an IPv4-mapped IPv6 client is an IPv4 client
    return address


def _checkable_domain(domain: str) -> str | None:
    """§4.3: the domain as an A-label name, or None if it is malformed or not multi-label."""
    domain = domain.strip()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")  # §4.3: A-labels (RFC 5890 §2.3)
        except UnicodeError:
            return None
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    return domain.lower()


def _describe(ip: Address, outcome: _Outcome, domain: str) -> str:
    if outcome.result == "none":
        return outcome.no_record or f"{domain} publishes no SPF record"
    chain = " > ".join(f"{term} ({where})" for where, term in outcome.path)
    decided = [t for _, t in outcome.path if not t.lower().startswith("redirect=")]
    if not decided:  # §4.7: nothing matched
        via = f" (via {chain})" if chain else ""
        return f"no mechanism matched {ip} in the SPF record of {outcome.domain}{via}: the default result is neutral"
    reason = f"{ip} matched {chain}"
    if outcome.explanation:
        reason += f"; explanation: {outcome.explanation}"
    return reason


async def check_host(
    ip: str | Address,
    domain: str,
    sender: str,
    resolver: Resolver,
    helo: str | None = None,
    *,
    receiver: str = "unknown",
    timeout: float = DEFAULT_TIMEOUT,
) -> SpfResult:
    """RFC 7208 §4: may `ip` send mail for `domain`, on behalf of `sender` (MAIL FROM, or postmaster@HELO)?

    Never raises for anything DNS or the record does; ValueError only if `ip` is not an IP address.
    """
    address = _client_address(ip)
    local, at, sender_domain = sender.rpartition("@")
    if not at:
        local, sender_domain = "", sender
    local = local or "postmaster"  # §4.3
    evaluation = _Evaluation(
        ip=address,
        sender=f"{local}@{sender_domain}",
        local=local,
        sender_domain=sender_domain,
        helo=helo or "unknown",
        receiver=receiver,
        resolver=resolver,
    )

    def done(result: str, reason: str, outcome: _Outcome | None = None) -> SpfResult:
        return SpfResult(
            result,
            domain,
            reason,
            explanation=outcome.explanation if outcome else None,
            path=outcome.path if outcome else (),
            lookups=min(evaluation.terms, MAX_DNS_TERMS),
            void_lookups=evaluation.voids,
            queries=evaluation.counter.lookups,
        )

    name = _checkable_domain(domain)
    if name is None:  # §4.3
        return done("none", f"{domain!r} is not a domain name SPF can check (RFC 7208 §4.3)")
    try:
        evaluation.deadline = time.monotonic() + timeout
        outcome = await evaluation.check(name, want_exp=True)
    except _PermError as exc:
        return done("permerror", str(exc))
    except DnsTempError as exc:
        return done("temperror", f"DNS lookup failed: {exc}")
    except TimeoutError:
        return done("temperror", f"SPF evaluation took longer than {timeout:g} s (RFC 7208 §4.6.4)")
    return done(outcome.result, _describe(address, outcome, name), outcome)


async def check_helo(
    ip: str | Address,
    helo: str,
    resolver: Resolver,
    *,
    receiver: str = "unknown",
    timeout: float = DEFAULT_TIMEOUT,
) -> SpfResult:
    """§2.3: the HELO identity, checked as postmaster@<helo>; an address literal or bare word gives none (§4.3)."""
    return await check_host(ip, helo, f"postmaster@{helo}", resolver, helo, receiver=receiver, timeout=timeout)


_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")  # RFC 2045 token, as RFC 8601 pvalue allows


def _pvalue(value: str) -> str:
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def evaluate_spf(
    ip: str | Address,
    helo: str | None,
    mail_from: str,
    resolver: Resolver,
    *,
    receiver: str = "unknown",
    timeout: float = DEFAULT_TIMEOUT,
) -> CheckResult:
    """The SPF check: MAIL FROM's domain, or the HELO identity for the null reverse-path (RFC 7208 §2.4)."""
    started = time.monotonic()
    try:
        ip = _client_address(ip)
    except ValueError:  # e.g. a local connection with no IP address: there is nothing to authorize
        return CheckResult(check="spf", result="none", reason=f"no client IP address to check ({ip!r})")
    mail_from = mail_from.strip()
    if mail_from.startswith("<") and mail_from.endswith(">"):
        mail_from = mail_from[1:-1].strip()
    if mail_from:
        identity, domain = "mailfrom", mail_from.rpartition("@")[2].lower()
        spf = await check_host(ip, domain, mail_from, resolver, helo, receiver=receiver, timeout=timeout)
    elif helo:
        identity, domain = "helo", helo.lower()
        spf = await check_helo(ip, helo, resolver, receiver=receiver, timeout=timeout)
    else:
        return CheckResult(
            check="spf",
            result="none",
            reason="no MAIL FROM domain and no HELO name to check",
            elapsed=time.monotonic() - started,
        )
    return CheckResult(
        check="spf",
        result=spf.result,
        reason=spf.reason,
        auth_results=(f"spf={spf.result} smtp.{identity}={_pvalue(domain)}",),
        details={
            "identity": identity,
            "domain": domain,
            "mechanism": spf.mechanism,
            "path": [list(step) for step in spf.path],
            "explanation": spf.explanation,
            "lookups": spf.lookups,
            "void_lookups": spf.void_lookups,
        },
        elapsed=time.monotonic() - started,
        dns_lookups=spf.queries,
    )
