"""The resolver against a real DNS server: caching by TTL, failures as temporary errors."""

from __future__ import annotations

import pytest

from mailwarden.dns.resolver import DnsTempError, QueryCounter, Resolver
from tests.conftest import DnsServer

ZONE = """
example.test. 300 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60
example.test. 300 IN MX 10 mail.example.test.
mail.example.test. 300 IN A 192.0.2.25
mail.example.test. 300 IN AAAA 2001:db8::25
alias.example.test. 300 IN CNAME mail.example.test.
example.test. 300 IN TXT "v=spf1 " "mx -all"
zero.example.test. 0 IN A 192.0.2.99
"""


def make(dns_server: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver([dns_server.address], timeout=timeout)


async def test_answers_follow_cnames_and_join_txt_strings(dns_server: DnsServer) -> None:
    dns_server.add(ZONE)
    r = make(dns_server)
    assert [(m.preference, m.exchange.to_text()) for m in (await r.resolve("Example.TEST.", "mx")).records] == [
        (10, "mail.example.test.")
    ]
    assert await r.txt("example.test") == ["v=spf1 mx -all"]
    assert [a.address for a in (await r.resolve("alias.example.test", "A")).records] == ["192.0.2.25"]
    assert sorted(await r.addresses("mail.example.test")) == ["192.0.2.25", "2001:db8::25"]


async def test_positive_and_negative_answers_are_cached(dns_server: DnsServer) -> None:
    dns_server.add(ZONE)
    r = make(dns_server)
    for _ in range(3):
        assert (await r.resolve("mail.example.test", "A")).records
        nx = await r.resolve("nothing.example.test", "A")
        assert nx.nxdomain and nx.records == () and nx.ttl == 60  # the SOA minimum
        nodata = await r.resolve("mail.example.test", "TXT")
        assert not nodata.nxdomain and nodata.records == ()
    asked = [q for q in dns_server.queries]
    assert asked.count(("mail.example.test", "A")) == 1
    assert asked.count(("nothing.example.test", "A")) == 1
    assert asked.count(("mail.example.test", "TXT")) == 1


async def test_ttl_zero_is_not_cached(dns_server: DnsServer) -> None:
    dns_server.add(ZONE)
    r = make(dns_server)
    await r.resolve("zero.example.test", "A")
    await r.resolve("zero.example.test", "A")
    assert dns_server.queries.count(("zero.example.test", "A")) == 2


async def test_servfail_is_a_temporary_error_not_no_record(dns_server: DnsServer) -> None:
    dns_server.add(ZONE)
    dns_server.servfail.add("example.test")
    with pytest.raises(DnsTempError, match="SERVFAIL"):
        await make(dns_server).txt("example.test")


async def test_timeout_is_a_temporary_error(dns_server: DnsServer) -> None:
    dns_server.silent.add("slow.example.test")
    with pytest.raises(DnsTempError, match="timed out"):
        await make(dns_server, timeout=0.3).resolve("slow.example.test", "A")


async def test_counter_counts_lookups_and_network_queries(dns_server: DnsServer) -> None:
    dns_server.add(ZONE)
    r = make(dns_server)
    c = QueryCounter()
    await r.resolve("mail.example.test", "A", c)
    await r.resolve("mail.example.test", "A", c)  # cached
    await r.resolve("alias.example.test", "A", c)  # the CNAME is followed within one answer
    assert (c.lookups, c.network) == (3, 2)


async def test_names_dns_cannot_carry_are_refused_before_any_query(dns_server: DnsServer) -> None:
    r = make(dns_server)
    with pytest.raises(ValueError):
        await r.resolve("a" * 64 + ".example.test", "A")
    with pytest.raises(ValueError):
        await r.resolve("bad..example.test", "A")
    assert dns_server.queries == []
