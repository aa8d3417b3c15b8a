"""The content stage: checks that read the message itself, run on inbound and outbound mail alike.

It holds the URI block list check (the domains the body links to) and the
content rules (checks/rules.py: lookalikes, link text, attachments) and the
spam classifier (checks/spam; inbound it runs after the authentication
checks, whose results are among its features). Milters run stage by stage
(pipeline/milters.py). The checks here run in both directions
without any change to the SMTP or delivery code:

* inbound, the data-stage verdict (pipeline/inbound.py) merges their results
  with SPF, DKIM, ARC and DMARC;
* outbound, mail from an authenticated user whose content verdict is junk,
  quarantine or reject is held in the queue with an alert, not sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mailwarden.checks.dnsbl import DnsblZone
from mailwarden.checks.result import Action, CheckResult
from mailwarden.checks.uribl import check_body
from mailwarden.dns import eager
from mailwarden.dns.resolver import Resolver


class ContentCheck(Protocol):
    name: str  # as in inbound.disabled_checks and the verdict's "<check>=<result>"

    async def check(self, message: bytes, direction: str) -> CheckResult | Sequence[CheckResult]:
        """`direction` is "inbound" or "outbound"; a check may treat them differently.

        A check with several named findings (checks/rules.py) returns one result per finding.
        """
        ...


class UriblCheck:
    name = "uribl"

    def __init__(self, zones: Sequence[DnsblZone], resolver: Resolver, max_lookups: int) -> None:
        self.zones = tuple(zones)
        self.resolver = resolver
        self.max_lookups = max_lookups

    async def check(self, message: bytes, direction: str) -> CheckResult:
        return await check_body(message, self.zones, self.resolver, max_lookups=self.max_lookups)


class ContentStage:
    def __init__(self, checks: Sequence[ContentCheck] = ()) -> None:
        self.checks = tuple(checks)

    def add(self, check: ContentCheck) -> None:
        """One more check (the server adds the spam classifier, which needs storage, after building the stage)."""
        self.checks += (check,)

    async def run(self, message: bytes, direction: str, disabled: frozenset[str] = frozenset()) -> list[CheckResult]:
        """Every enabled check's results, concurrently, in the order the checks were given (lists flattened)."""
        found = await eager.gather(*(c.check(message, direction) for c in self.checks if c.name not in disabled))
        results: list[CheckResult] = []
        for r in found:
            if isinstance(r, CheckResult):
                results.append(r)
            else:
                results.extend(r)
        return results


def outbound_hold_reason(results: Sequence[CheckResult], junk_score: float) -> str:
    """Why outbound content must be held ("" to send): a check that asks for junk or worse, or too high a score."""
    bad = [r for r in results if r.action in (Action.JUNK, Action.QUARANTINE, Action.REJECT)]
    if bad:
        return "; ".join(f"{r.check}={r.result}: {r.reason}" for r in bad)
    score = sum(r.score for r in results)
    if score >= junk_score:
        return (
            f"content score {score:g} >= {junk_score:g} (" + ", ".join(f"{r.check}={r.result}" for r in results) + ")"
        )
    return ""
