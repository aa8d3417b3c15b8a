"""The openspf RFC 7208 test suite (tests/data/spf/rfc7208-tests.yml), every case, against a real DNS server.

Each case's scenario zone is served by the `dns_server` fixture and the check runs
through the real `Resolver`, exactly as in production. The zone data follows the
conventions of the suite's reference driver (pyspf's test/testspf.py):

* An "SPF" entry is a type 99 record. RFC 7208 uses TXT only, so a driver also
  serves each SPF entry as TXT, unless the name has any TXT entry of its own
  ("TXT: NONE" is such an entry: it only switches that copying off).
* "TIMEOUT" means: a query for a type with no record listed before it gets no
  answer. The fixture can only silence whole names, so a name is silent when no
  TXT record precedes its TIMEOUT (TXT is the type this suite's scenarios ask of
  those names); entries after TIMEOUT, and copied TXT records, are never served.
* A record with no strings (`SPF: []`) cannot be sent on the wire (dnspython
  refuses an empty TXT); it is served as one empty string, which reads the same.
* "explanation: DEFAULT" means the domain gave no explanation of its own (exp=).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RR, TXT, A

from mailwarden.checks.spf import RESULTS, evaluate_spf
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

SUITE = Path(__file__).parent / "data" / "spf" / "rfc7208-tests.yml"
TIMEOUT = 0.2  # seconds a silent name keeps the resolver waiting


def _cases() -> list[Any]:
    cases = []
    with SUITE.open(encoding="utf-8") as f:
        for scenario in yaml.safe_load_all(f):
            for name, case in scenario["tests"].items():
                cases.append(pytest.param(scenario["zonedata"], case, id=f"{scenario['description']}/{name}"))
    return cases


CASES = _cases()


def _strings(value: str | list[str]) -> list[bytes]:
    strings = [value] if isinstance(value, str) else list(value)
    return [s.encode("utf-8") for s in strings] or [b""]


def _rr(name: str, rtype: str, value: Any) -> RR:
    if rtype in ("TXT", "SPF"):
        rdata: Any = TXT(_strings(value))
    elif rtype == "A":
        rdata = A(value)
    elif rtype == "AAAA":
        rdata = AAAA(value)
    elif rtype == "MX":
        preference, host = value
        rdata = MX(host, preference)
    elif rtype == "PTR":
        rdata = PTR(value)
    elif rtype == "CNAME":
        rdata = CNAME(value)
    else:
        raise ValueError(f"zone data type {rtype} is not supported by this driver")
    return RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=300)


def serve(dns_server: DnsServer, zonedata: dict[str, list[Any]]) -> None:
    for name, entries in zonedata.items():
        key = name.lower().rstrip(".")
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        copies: list[RR] = []
        txt_served = False
        timed_out = False
        for entry in entries:
            if entry == "TIMEOUT":
                timed_out = True
                if not txt_served:
                    dns_server.silent.add(key)
                break
            if entry == "SERVFAIL":
                dns_server.servfail.add(key)
                continue
            ((rtype, value),) = entry.items()
            if value == "NONE":
                continue
            dns_server.records.append(_rr(name, rtype, value))
            if rtype == "TXT":
                txt_served = True
            elif rtype == "SPF" and not has_txt:
                copies.append(_rr(name, "TXT", value))
        if not timed_out:
            dns_server.records.extend(copies)


def test_the_whole_suite_is_here() -> None:
    assert len(CASES) == 203


@pytest.mark.parametrize(("zonedata", "case"), CASES)
async def test_rfc7208(dns_server: DnsServer, zonedata: dict[str, list[Any]], case: dict[str, Any]) -> None:
    serve(dns_server, zonedata)
    resolver = Resolver([dns_server.address], timeout=TIMEOUT)  # a fresh cache for every case
    checked = await evaluate_spf(case["host"], case["helo"], case["mailfrom"], resolver, receiver="receiver.test")

    expected = [case["result"]] if isinstance(case["result"], str) else case["result"]
    assert set(expected) <= set(RESULTS)
    assert checked.result in expected, checked.reason
    if "explanation" in case:
        wanted = None if case["explanation"] == "DEFAULT" else case["explanation"]
        assert checked.details["explanation"] == wanted, checked.reason
