"""The public suffix list: which part of a name a registrant controls.

One list per process (publicsuffixlist ships its data, so this works offline;
building it takes ~50 ms and several MB, so it is built once). DMARC uses
`organizational_domain` (RFC 7489 §3.2), the block lists `registrable_domain`.
"""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList


@functools.cache
def public_suffix_list() -> PublicSuffixList:
    return PublicSuffixList()


_CACHED_NAME_LENGTH = 255  # longer names are junk; computing them again is cheaper than keeping them


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the registrable domain; a public suffix is its own."""
    domain = domain.lower().rstrip(".")
    return public_suffix_list().privatesuffix(domain) or domain


def registrable_domain(host: str) -> str | None:
    """`_registrable_domain`, remembered for names of a sane length: the same hosts recur in every message."""
    if len(host) > _CACHED_NAME_LENGTH:
        return _registrable_domain(host)
    return _cached_registrable_domain(host)


def _registrable_domain(host: str) -> str | None:
    """The registrable domain of `host`, IDNA-encoded and lower case; None if it has none.

    None for IP literals, single labels, public suffixes themselves, and names
    DNS cannot carry.
    """
    host = host.strip().rstrip(".").lower()
    if not host or len(host) > 1000:
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(host) > 253:
        return None
    labels = host.split(".")
    if len(labels) < 2:
        return None
    for lab in labels:
        if not lab or len(lab) > 63 or not all(c.isalnum() or c in "-_" for c in lab):
            return None
        if lab.startswith("xn--"):
            try:
                lab.encode("ascii").decode("idna")
            except UnicodeError:
                return None  # not valid punycode: no registrar would hold it
    if labels[-1].isdigit():  # an IPv4 literal, or a bogus numeric TLD
        return None
    found = public_suffix_list().privatesuffix(host)
    return found if isinstance(found, str) else None


_cached_registrable_domain = functools.lru_cache(maxsize=8192)(_registrable_domain)
