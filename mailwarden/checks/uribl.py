"""URI block lists: the domains a message body links to, against domain zones (Spamhaus DBL, URIBL, SURBL).

`body_links.extract_domains` finds the registrable domains; each is looked up
in every domain zone with the same rules as `dnsbl` (error codes and insane
zones are admin alerts, never listings; an outage is a temperror with no
action). The number of lookups is capped, since the body is attacker-chosen:
a message with a thousand links must not cost a thousand queries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mailwarden.checks.body_links import extract_domains
from mailwarden.checks.dnsbl import DnsblZone, lookup_names
from mailwarden.checks.offload import run_cpu_bound
from mailwarden.checks.result import CheckResult
from mailwarden.dns.resolver import Resolver


async def check_body(
    message: bytes, zones: Iterable[DnsblZone], resolver: Resolver, *, max_lookups: int = 20
) -> CheckResult:
    """Look up the body's linked domains; at most `max_lookups` block list queries (domains x zones).

    The cap counts listing queries; a zone's RFC 5782 sanity probe, made only
    after a hit and then cached, is on top.
    """
    domain_zones = [z for z in zones if z.kind == "domain"]
    per_zone = max_lookups // len(domain_zones) if domain_zones else 0
    # One more than we may ask, to know whether the cap cut anything off. Parsing is
    # bounded CPU work; big messages are parsed off the event loop (checks/offload.py).
    domains = await run_cpu_bound(len(message), lambda: extract_domains(message, per_zone + 1)) if per_zone > 0 else []
    details: dict[str, Any] = {"domains": domains[:per_zone], "truncated": len(domains) > per_zone}
    return await lookup_names("uribl", domains[:per_zone], domain_zones, resolver, details)
