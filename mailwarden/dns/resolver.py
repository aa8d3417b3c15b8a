"""The one DNS resolver: async (dnspython), cached, and strict about failure.

Every check resolves through `Resolver.resolve`. Three rules matter for mail:

* A SERVFAIL, REFUSED or timeout from every server is `DnsTempError`, never
  "no record": reading an outage as "no SPF record" or "not listed" turns a
  temporary problem into a wrong verdict.
* NXDOMAIN and NODATA are answers (`DnsResult.records == ()`), cached for the
  SOA minimum of the authority section (RFC 2308 §5), and positive answers
  for their TTL, capped at `max_ttl`.
* Each caller may pass a `QueryCounter`, so a check can report (and limit)
  how many lookups it caused.

Servers come from config (`dns.servers`, HOST:PORT each) or, if that is
empty, from /etc/resolv.conf.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

_MAX_CNAME_DEPTH = 8
_DEFAULT_NEGATIVE_TTL = 300


class DnsTempError(Exception):
    """No usable answer this time (SERVFAIL, REFUSED, timeout): try again later."""

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"{name}/{rdtype}: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


@dataclass(frozen=True)
class DnsResult:
    """An answer. `records` are dnspython rdata objects; empty for NXDOMAIN and NODATA."""

    name: str
    rdtype: str
    rcode: str  # "NOERROR" or "NXDOMAIN"
    records: tuple[Any, ...]
    ttl: int
    authenticated: bool = False  # the AD bit, for DANE

    @property
    def nxdomain(self) -> bool:
        return self.rcode == "NXDOMAIN"

    def texts(self) -> list[str]:
        """TXT records, each record's strings joined (RFC 7208 §3.3), decoded as UTF-8 with replacement."""
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self.records]


@dataclass
class QueryCounter:
    """Lookups made on behalf of one check: `lookups` asked, `network` sent to a server."""

    lookups: int = 0
    network: int = 0
    names: list[str] = field(default_factory=list)


def system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    servers: list[tuple[str, int]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append((parts[1], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


class Resolver:
    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = 5.0,
        cache_size: int = 10_000,
        max_ttl: int = 86_400,
    ) -> None:
        self.servers = list(servers) if servers else system_nameservers()
        self.timeout = timeout
        self.cache_size = cache_size
        self.max_ttl = max_ttl
        self._cache: OrderedDict[tuple[str, str], tuple[float, DnsResult]] = OrderedDict()

    async def resolve(self, name: str, rdtype: str, counter: QueryCounter | None = None) -> DnsResult:
        """Answer for (name, rdtype), following CNAMEs; raises DnsTempError."""
        rdtype = rdtype.upper()
        qname = name.strip().rstrip(".").lower()
        if (qname, rdtype) not in self._cache:
            qname = _normalize(name)  # full validation only for names not already answered
        if counter is not None:
            counter.lookups += 1
            counter.names.append(f"{qname}/{rdtype}")
        return await self._resolve(qname, rdtype, counter, 0)

    def has_answer(self, name: str, rdtype: str) -> bool:
        """Whether `resolve` would answer from the cache (without waiting)."""
        hit = self._cache.get((name.strip().rstrip(".").lower(), rdtype.upper()))
        return hit is not None and hit[0] > time.monotonic()

    async def _resolve(self, qname: str, rdtype: str, counter: QueryCounter | None, depth: int) -> DnsResult:
        key = (qname, rdtype)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        response = await self._query(qname, rdtype, counter)
        result, cname = self._interpret(qname, rdtype, response)
        if cname is not None and not result.records:
            if depth >= _MAX_CNAME_DEPTH:
                raise DnsTempError(qname, rdtype, "CNAME chain too long")
            target = await self._resolve(cname, rdtype, counter, depth + 1)
            result = DnsResult(
                qname, rdtype, target.rcode, target.records, min(result.ttl, target.ttl), target.authenticated
            )
        self._store(key, result, now)
        return result

    async def _query(self, qname: str, rdtype: str, counter: QueryCounter | None) -> dns.message.Message:
        request = dns.message.make_query(qname, rdtype, want_dnssec=False)
        request.flags |= dns.flags.AD  # ask for the AD bit (RFC 6840 §5.7) without DO
        problems: list[str] = []
        for host, port in self.servers:
            if counter is not None:
                counter.network += 1
            try:
                response = await dns.asyncquery.udp(request, host, timeout=self.timeout, port=port)
                if response.flags & dns.flags.TC:
                    response = await dns.asyncquery.tcp(request, host, timeout=self.timeout, port=port)
            except dns.exception.Timeout:
                problems.append(f"{host}:{port} timed out")
                continue
            except (OSError, dns.exception.DNSException) as exc:
                problems.append(f"{host}:{port} {type(exc).__name__}")
                continue
            rcode = response.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            problems.append(f"{host}:{port} {dns.rcode.to_text(rcode)}")
        raise DnsTempError(qname, rdtype, "; ".join(problems) or "no servers")

    def _interpret(self, qname: str, rdtype: str, response: dns.message.Message) -> tuple[DnsResult, str | None]:
        want = dns.rdatatype.from_text(rdtype)
        name = dns.name.from_text(qname)
        ad = bool(response.flags & dns.flags.AD)
        records: list[Any] = []
        ttl: int | None = None
        cname: str | None = None
        current = name
        # Follow a CNAME chain inside the answer section.
        for _ in range(_MAX_CNAME_DEPTH + 1):
            rrset = _find(response.answer, current, want)
            if rrset is not None:
                records = list(rrset)
                ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
                cname = None
                break
            alias = _find(response.answer, current, dns.rdatatype.CNAME)
            if alias is None:
                break
            ttl = alias.ttl if ttl is None else min(ttl, alias.ttl)
            current = alias[0].target
            cname = current.to_text(omit_final_dot=True).lower()
        if response.rcode() == dns.rcode.NXDOMAIN and not records:
            return DnsResult(qname, rdtype, "NXDOMAIN", (), _negative_ttl(response), ad), None
        if not records:
            neg = _negative_ttl(response)
            return DnsResult(qname, rdtype, "NOERROR", (), neg if ttl is None else min(ttl, neg), ad), cname
        return DnsResult(qname, rdtype, "NOERROR", tuple(records), ttl or 0, ad), None

    def _store(self, key: tuple[str, str], result: DnsResult, now: float) -> None:
        ttl = min(result.ttl, self.max_ttl)
        if ttl <= 0:
            return
        self._cache[key] = (now + ttl, result)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # ---- conveniences ---------------------------------------------------

    async def txt(self, name: str, counter: QueryCounter | None = None) -> list[str]:
        return (await self.resolve(name, "TXT", counter)).texts()

    async def addresses(self, name: str, counter: QueryCounter | None = None) -> list[str]:
        """A and AAAA addresses (two lookups)."""
        out = [r.address for r in (await self.resolve(name, "A", counter)).records]
        out += [r.address for r in (await self.resolve(name, "AAAA", counter)).records]
        return out


def _normalize(name: str) -> str:
    """Lower-case, no trailing dot; ValueError if DNS cannot carry the name."""
    name = name.strip().rstrip(".").lower()
    try:
        dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ValueError(f"not a domain name: {name!r} ({type(exc).__name__})") from None
    if not name or ".." in name:
        raise ValueError(f"not a domain name: {name!r}")
    return name


def _find(section: list[Any], name: dns.name.Name, rdtype: int) -> Any:
    for rrset in section:
        if rrset.name == name and rrset.rdtype == rdtype:
            return rrset
    return None


def _negative_ttl(response: dns.message.Message) -> int:
    """RFC 2308 §5: the SOA's TTL, capped by its MINIMUM field."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, rrset[0].minimum)
    return _DEFAULT_NEGATIVE_TTL
