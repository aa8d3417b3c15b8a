"""An nftables set kept in step with Mailwarden's bans (config `firewall.nftables`).

Why: a ban enforced by the server still costs an accept(), a TLS-less greeting and a 421 per
connection; in the kernel a banned client's packets are dropped before they reach the process.
The ban module stays the source of truth (it persists bans and decides their length); this module
only mirrors each ban into the table shipped as contrib/nftables/mailwarden.nft:

    table inet mailwarden { set banned4 ..., set banned6 ..., chain input (drop saddr in them) }

Elements carry `timeout <n>s`, so the kernel expires them on its own even if the server is down
when the ban ends; `remove` is for an early unban. Both sets have `flags interval`, so a subnet ban
(IPv6 /64 aggregation) is one element.

`nft` runs as a subprocess (argument vector, never a shell) with a timeout, one at a time; each
change is one nft transaction read from stdin, written so that it succeeds whether or not the
element is already there (add + delete + add), which also replaces the timeout of a ban that grew.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from mailwarden.logs import log_event

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SET4 = "banned4"
SET6 = "banned6"
MAIL_PORTS = (25, 465, 587, 143, 993)
_MAX_OUTPUT = 1 << 20  # bytes of nft output read for a listing; the terse listing is a few hundred


class NftError(Exception):
    """`nft` failed, timed out, is missing, or the table is not the one this module drives."""


def render_definition(family: str = "inet", table: str = "mailwarden") -> str:
    """The table and rules; contrib/nftables/mailwarden.nft is this text (a test keeps them equal)."""
    ports = ", ".join(str(p) for p in MAIL_PORTS)
    return f"""#!/usr/sbin/nft -f
# Mailwarden's ban sets (docs/security.md, "nftables"). Mailwarden adds each banned address with
# `timeout <n>s` when `firewall.nftables = true`; the kernel drops the element when the ban ends.
#
# Load it once: `nft -f mailwarden.nft`, or `include` it from /etc/nftables.conf (which starts with
# `flush ruleset`). Loading it again on a live ruleset appends the rules a second time. With
# `firewall.nft_setup = true` (the default) the server loads this itself when the table is missing.
#
# Ports: the mail listeners (SMTP 25, submissions 465, submission 587, IMAP 143, IMAPS 993). Edit
# the port list to suit; a banned client still reaches other services (SSH, the web admin), so an
# admin who banned themselves is not locked out of the machine.
# Priority: filter - 10 runs before the usual filter chains (priority 0); a drop in any input chain
# is final, so the order only saves work. Established connections from a banned address are dropped
# too (no conntrack exception): the server ends them with 421 anyway.

table {family} {table} {{
\tset {SET4} {{
\t\ttype ipv4_addr
\t\tflags interval, timeout
\t}}

\tset {SET6} {{
\t\ttype ipv6_addr
\t\tflags interval, timeout
\t}}

\tchain input {{
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tip saddr @{SET4} tcp dport {{ {ports} }} drop
\t\tip6 saddr @{SET6} tcp dport {{ {ports} }} drop
\t}}
}}
"""


class NftBanSet:
    """Adds and removes banned networks in the `banned4`/`banned6` sets of one nftables table.

    `command_prefix` runs nft through another command (the tests use ["ip", "netns", "exec", NAME]).
    """

    def __init__(
        self,
        table: str = "inet mailwarden",
        *,
        create: bool = True,
        nft: str = "nft",
        command_prefix: Sequence[str] = (),
        timeout: float = 10.0,
    ) -> None:
        family, _, name = table.partition(" ")
        if family not in ("inet", "ip", "ip6") or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise NftError(f'table must be "<family> <name>" with family inet, ip or ip6, got {table!r}')
        self.family, self.table = family, name
        self.create = create
        self.argv = [*command_prefix, nft]
        self.timeout = timeout
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, cfg: Any) -> NftBanSet | None:
        """None unless `firewall.nftables` is true."""
        if not cfg.get("firewall.nftables"):
            return None
        return cls(cfg.get("firewall.nft_table"), create=cfg.get("firewall.nft_setup"))

    async def setup(self) -> None:
        """Check that the table has both sets with the timeout and interval flags; load it first if missing.

        Raises NftError when nft cannot run, the table is missing and `create` is off, or it has the wrong shape.
        """
        try:
            listing = await self._nft("-j", "-t", "list", "table", self.family, self.table)
        except NftError as exc:
            if "No such file or directory" not in str(exc) or not self.create:
                raise
            await self._nft("-f", "-", stdin=render_definition(self.family, self.table))
            log_event("nft_table_created", table=f"{self.family} {self.table}")
            listing = await self._nft("-j", "-t", "list", "table", self.family, self.table)
        self._check_shape(listing)

    def _check_shape(self, listing: str) -> None:
        try:
            items = json.loads(listing)["nftables"]
        except (ValueError, KeyError, TypeError):
            raise NftError(f"unexpected output of nft -j list table: {listing[:200]!r}") from None
        sets = {i["set"]["name"]: i["set"] for i in items if isinstance(i, dict) and "set" in i}
        for name, kind in ((SET4, "ipv4_addr"), (SET6, "ipv6_addr")):
            found = sets.get(name)
            if found is None:
                raise NftError(
                    f"table {self.family} {self.table} has no set {name} (load contrib/nftables/mailwarden.nft)"
                )
            flags = set(found.get("flags", ()))
            if found.get("type") != kind or not {"timeout", "interval"} <= flags:
                raise NftError(f"set {name} must be type {kind} with flags interval, timeout; it is {found}")

    async def add(self, network: IPNetwork, seconds: float | None) -> None:
        """Drop `network` for `seconds` (None or <= 0: until removed). An existing element gets the new timeout."""
        set_name, element = self._element(network)
        timeout = f" timeout {max(1, math.ceil(seconds))}s" if seconds is not None and seconds > 0 else ""
        where = f"element {self.family} {self.table} {set_name}"
        await self._nft(
            "-f",
            "-",
            stdin=f"add {where} {{ {element} }}\ndelete {where} {{ {element} }}\nadd {where} {{ {element}{timeout} }}\n",
        )
        log_event("nft_add", ip=element, timeout=timeout.strip().removeprefix("timeout ") or "none")

    async def remove(self, network: IPNetwork) -> None:
        """Stop dropping `network` now (an unban); no error if it was not there or already expired."""
        set_name, element = self._element(network)
        where = f"element {self.family} {self.table} {set_name}"
        await self._nft("-f", "-", stdin=f"add {where} {{ {element} }}\ndelete {where} {{ {element} }}\n")
        log_event("nft_remove", ip=element)

    async def on_ban(self, network: IPNetwork, seconds: float) -> None:
        """The ban module's callback: a failure is logged, never raised into the ban path."""
        try:
            await self.add(network, seconds)
        except NftError as exc:
            log_event("nft_error", logging.ERROR, op="add", ip=str(network), error=str(exc))

    async def on_unban(self, network: IPNetwork) -> None:
        try:
            await self.remove(network)
        except NftError as exc:
            log_event("nft_error", logging.ERROR, op="remove", ip=str(network), error=str(exc))

    @staticmethod
    def _element(network: IPNetwork) -> tuple[str, str]:
        """(set name, element text); an IPv4-mapped IPv6 address goes to the IPv4 set, a host is a bare address."""
        if not isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise NftError(f"not an ip network: {network!r}")
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
            mapped = network.network_address.ipv4_mapped
            if mapped is not None:
                network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}", strict=False)
        text = str(network.network_address) if network.prefixlen == network.max_prefixlen else str(network)
        return (SET4 if network.version == 4 else SET6), text

    async def _nft(self, *args: str, stdin: str | None = None) -> str:
        argv = [*self.argv, *args]
        async with self._lock:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                raise NftError(f"cannot run {argv[0]}: {exc}") from None
            try:
                out, err = await asyncio.wait_for(
                    proc.communicate(stdin.encode() if stdin is not None else None), self.timeout
                )
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise NftError(f"{' '.join(argv)} did not finish within {self.timeout:.0f}s") from None
        if proc.returncode != 0:
            text = err.decode("utf-8", "replace").strip().replace("\n", " | ")
            raise NftError(f"{' '.join(argv)} exited {proc.returncode}: {text[:500]}")
        if len(out) > _MAX_OUTPUT:
            raise NftError(f"{' '.join(argv)}: output larger than {_MAX_OUTPUT} bytes")
        return out.decode("utf-8", "replace")
