"""An in-memory snapshot of domains, accounts and aliases.

Every RCPT and every AUTH asks the directory. Querying the database each
time cost about 2 ms of CPU per lookup through SQLAlchemy's async layer
(measured, see docs/performance.md), so the store keeps this snapshot and
reloads it when the `directory_serial` counter changes; every change to
domains, accounts or aliases, from any process, bumps that counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mailwarden.storage.interfaces import Account, Resolution, SigningKey, StorageError

_MAX_ALIAS_DEPTH = 8


def split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise StorageError(f"not an address: {address!r}")
    return local, domain


@dataclass
class Directory:
    serial: int
    domains: set[str] = field(default_factory=set)
    accounts: dict[str, Account] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)  # source -> targets
    owners: dict[str, list[str]] = field(default_factory=dict)  # target -> sources
    signing_keys: dict[str, list[SigningKey]] = field(default_factory=dict)  # domain -> active keys

    @classmethod
    def build(
        cls,
        serial: int,
        domains: Iterable[str],
        accounts: Iterable[Account],
        aliases: Iterable[tuple[str, str]],
        signing_keys: Iterable[SigningKey] = (),
    ) -> Directory:
        d = cls(serial, set(domains), {a.address: a for a in accounts})
        for key in signing_keys:
            if key.state == "active":
                d.signing_keys.setdefault(key.domain, []).append(key)
        for source, target in aliases:
            d.aliases.setdefault(source, []).append(target)
            d.owners.setdefault(target, []).append(source)
        return d

    def resolve(self, address: str, delimiter: str) -> Resolution:
        """Map an envelope recipient to local accounts and remote addresses.

        Order: exact account or alias, then the address without its +tag,
        then the domain's catch-all alias (which exists only if an admin
        added one). Aliases expand recursively to a bounded depth.
        """
        address = address.strip().lower()
        local, domain = split_address(address)
        if domain not in self.domains:
            return Resolution("relay", remote=(address,))
        candidates = [address]
        if delimiter and delimiter in local:
            candidates.append(f"{local.split(delimiter, 1)[0]}@{domain}")
        candidates.append(f"@{domain}")
        for candidate in candidates:
            found: dict[str, str] = {}
            self._expand(candidate, 0, found)
            if found:
                return Resolution(
                    "hosted",
                    tuple(a for a, k in found.items() if k == "local"),
                    tuple(a for a, k in found.items() if k == "remote"),
                )
        return Resolution("unknown")

    def _expand(self, address: str, depth: int, found: dict[str, str]) -> None:
        if depth > _MAX_ALIAS_DEPTH or address in found:
            return
        if address in self.accounts:
            found[address] = "local"
            return
        for target in self.aliases.get(address, ()):
            _, tdomain = split_address(target)
            if tdomain in self.domains:
                self._expand(target, depth + 1, found)
            else:
                found[target] = "remote"

    def sender_addresses(self, account: str) -> set[str]:
        """The account's own address and every alias that delivers to it."""
        owned = {account.lower()}
        frontier = [account.lower()]
        while frontier and len(owned) < 1000:
            nxt = []
            for target in frontier:
                for source in self.owners.get(target, ()):
                    if source not in owned and not source.startswith("@"):
                        owned.add(source)
                        nxt.append(source)
            frontier = nxt
        return owned
