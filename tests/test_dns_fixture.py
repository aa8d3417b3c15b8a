"""The dnslib fixture serves the zones a test declares, to a real resolver."""

from __future__ import annotations

import dns.asyncresolver
import dns.resolver
import pytest

from tests.conftest import DnsServer


def resolver_for(dns_server: DnsServer) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [dns_server.host]
    r.port = dns_server.port
    r.lifetime = 5
    return r


async def test_serves_declared_records_and_nxdomain(dns_server: DnsServer) -> None:
    dns_server.add(
        """
example.test. 300 IN MX 10 mail.example.test.
mail.example.test. 300 IN A 192.0.2.25
example.test. 300 IN TXT "v=spf1 mx -all"
"""
    )
    r = resolver_for(dns_server)
    mx = await r.resolve("example.test", "MX")
    assert [(a.preference, str(a.exchange)) for a in mx] == [(10, "mail.example.test.")]
    assert [a.address for a in await r.resolve("mail.example.test", "A")] == ["192.0.2.25"]
    assert [b"".join(a.strings) for a in await r.resolve("example.test", "TXT")] == [b"v=spf1 mx -all"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        await r.resolve("nothing.example.test", "A")
