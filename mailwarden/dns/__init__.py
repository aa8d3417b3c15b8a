"""DNS: the one resolver every check uses (resolver.py)."""

from __future__ import annotations

from mailwarden.config import Config, parse_address
from mailwarden.dns.resolver import DnsResult, DnsTempError, QueryCounter, Resolver

__all__ = ["DnsResult", "DnsTempError", "QueryCounter", "Resolver", "resolver_from_config"]


def resolver_from_config(config: Config) -> Resolver:
    servers = [parse_address("dns.servers", s) for s in config.get("dns.servers")]
    return Resolver(servers or None, timeout=config.get("dns.timeout"), cache_size=config.get("dns.cache_size"))
