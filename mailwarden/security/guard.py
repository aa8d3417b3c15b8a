"""The connection guard every listener consults: allow/deny lists, bans, connection and command limits.

Protocol-neutral on purpose: SMTP calls it today, IMAP and the web login will
call the same methods. A listener asks `connection_opened(listener, ip)` before
it greets (and renders the `Decision` in its own protocol), reports
`connection_closed(...)`, and `record(event, ip, ...)`s what counts towards a
ban (security/bans.py). The allow list always wins: an allowed address is never
refused, limited or banned on that listener.

Limits and counters are per process (each worker counts its own connections);
bans are shared through storage.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailwarden.config import GUARD_LISTENERS, Config
from mailwarden.logs import log_event
from mailwarden.security.bans import (
    Ban,
    BanBook,
    BanPolicy,
    BanStore,
    Network,
    _Bounded,
    _prune,
    network_of,
    utc_stamp,
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Decision:
    """Whether a connection may go on; when not, a reply for the listener to render and a metrics reason."""

    ok: bool
    code: int = 0
    enhanced: str = ""
    text: str = ""
    reason: str = ""

    def line(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


ADMIT = Decision(True)


def parse_entry(entry: str) -> tuple[str | None, Network]:
    """'CIDR' (every listener) or 'LISTENER:CIDR' -> (listener or None, network); raises ValueError."""
    listener, sep, rest = entry.strip().partition(":")
    if sep and listener in GUARD_LISTENERS:
        return listener, ipaddress.ip_network(rest.strip(), strict=False)
    return None, ipaddress.ip_network(entry.strip(), strict=False)


def normalize_entry(entry: str) -> str:
    """The canonical spelling of an entry, as stored by the CLI (so add and remove agree)."""
    listener, net = parse_entry(entry)
    return f"{listener}:{net}" if listener else str(net)


@dataclass
class AccessList:
    """CIDR entries, each for every listener or for one."""

    entries: list[tuple[str | None, Network]] = field(default_factory=list)

    @classmethod
    def parse(cls, items: list[str]) -> AccessList:
        out = []
        for item in items:
            try:
                out.append(parse_entry(item))
            except ValueError:
                log_event("guard_bad_entry", logging.ERROR, entry=item)
        return cls(out)

    def matches(self, listener: str | None, addr: Address) -> bool:
        for where, net in self.entries:
            if (where is None or where == listener) and addr.version == net.version and addr in net:
                return True
        return False

    def covers(self, net: Network) -> bool:
        """True if an every-listener entry holds all of `net` (such a network is never banned)."""
        return any(
            where is None and n.version == net.version and net.subnet_of(n)  # type: ignore[arg-type]
            for where, n in self.entries
        )


@dataclass
class CommandMeter:
    """Commands per minute for one session (a fixed one-minute window: one comparison per command)."""

    limit: int
    clock: Callable[[], float]
    _start: float = 0.0
    _count: int = 0

    def tick(self) -> bool:
        """Count one command; False once the session is over its limit."""
        now = self.clock()
        if now - self._start >= 60.0:
            self._start, self._count = now, 0
        self._count += 1
        return self._count <= self.limit


class Guard:
    """One per process; shared by every listener of that process."""

    def __init__(
        self, cfg: Config, store: BanStore, clock: Callable[[], float] = time.time, firewall: bool = True
    ) -> None:
        self.store = store
        self.clock = clock
        self.v6_prefix: int = cfg.get("guard.ipv6_prefix")
        self.max_connections: int = cfg.get("guard.max_connections")
        self.max_per_minute: int = cfg.get("guard.max_connections_per_minute")
        self.max_commands: int = cfg.get("guard.max_commands_per_minute")
        self.greet_delay: float = cfg.get("guard.greet_delay")
        self.idle_timeout: float = cfg.get("guard.idle_timeout")
        self.sync_interval: float = cfg.get("guard.sync_interval")
        self._config_allow: list[str] = list(cfg.get("guard.allow"))
        self._config_deny: list[str] = list(cfg.get("guard.deny"))
        self.allow = AccessList.parse(self._config_allow)
        self.deny = AccessList.parse(self._config_deny)
        self.bans = BanBook(
            BanPolicy.from_config(cfg), store, is_allowed=self.allow.covers, clock=clock, firewall=firewall
        )
        self._open: dict[tuple[str, Network], int] = {}
        self._rate: _Bounded = _Bounded(100_000)
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    # ---- life cycle -----------------------------------------------------

    async def start(self) -> None:
        """Load bans and CLI entries, then keep them current every guard.sync_interval seconds."""
        await self.sync()
        self._task = asyncio.create_task(self._sync_forever(), name="guard-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._pending):
            task.cancel()

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except Exception as exc:  # storage trouble must not end the guard; the old view stays
                log_event("guard_sync_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")

    async def sync(self) -> None:
        """Reload CLI allow/deny entries and active bans from storage."""
        entries = await self.store.guard_list_entries()  # type: ignore[attr-defined]
        allow = self._config_allow + [e for kind, e in entries if kind == "allow"]
        deny = self._config_deny + [e for kind, e in entries if kind == "deny"]
        self.allow.entries = AccessList.parse(allow).entries
        self.deny.entries = AccessList.parse(deny).entries
        await self.bans.refresh()

    # ---- connections ------------------------------------------------------

    def network(self, ip: str) -> Network:
        return network_of(ip, self.v6_prefix)

    async def connection_opened(self, listener: str, ip: str) -> Decision:
        """Admit or refuse a new connection; an admitted one must be reported to connection_closed."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ADMIT  # not an IP peer (a Unix socket): nothing to key on
        if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
            addr = addr.ipv4_mapped  # type: ignore[union-attr]
        if self.allow.matches(listener, addr):
            return ADMIT
        if self.deny.matches(listener, addr):
            return Decision(False, 554, "5.7.1", "Access denied for your address", "denied")
        net = network_of(addr, self.v6_prefix)
        ban = self.bans.banned(net)
        if ban is not None:
            ban = await self.bans.confirm(ban)
        if ban is not None:
            return banned_decision(ban)
        key = (listener, net)
        if self._open.get(key, 0) >= self.max_connections:
            return Decision(False, 421, "4.7.0", "Too many connections from your address, try later", "conn_limit")
        now = self.clock()
        stamps = self._rate.touch(key, deque)
        _prune(stamps, now - 60.0)
        if len(stamps) >= self.max_per_minute:
            return Decision(False, 421, "4.7.0", "Too many connections per minute from your address", "conn_rate")
        stamps.append(now)
        self._open[key] = self._open.get(key, 0) + 1
        return ADMIT

    def connection_closed(self, listener: str, ip: str, admitted: bool, silent: bool) -> None:
        """Release an admitted connection; `silent` (it never sent a command) counts as port scanning."""
        if not admitted:
            return
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return
        key = (listener, network_of(addr, self.v6_prefix))
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
        if silent:
            self._spawn(self.record("scanner", ip, listener=listener))

    def open_connections(self, listener: str, ip: str) -> int:
        return self._open.get((listener, self.network(ip)), 0)

    def command_meter(self) -> CommandMeter:
        return CommandMeter(self.max_commands, self.clock)

    # ---- events -------------------------------------------------------------

    async def record(
        self,
        event: str,
        ip: str,
        account: str | None = None,
        secret_fingerprint: bytes | None = None,
        listener: str | None = None,
    ) -> Ban | None:
        """Count a ban event (security/bans.py); returns the ban it caused. Allowed addresses never count."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if self.allow.matches(listener, addr):
            return None
        return await self.bans.record(event, ip, account, secret_fingerprint)

    def fingerprint(self, secret: bytes) -> bytes:
        return self.bans.fingerprint(secret)

    def auth_delay(self, account: str) -> float:
        return self.bans.auth_delay(account)

    def account_failures(self, account: str) -> int:
        return self.bans.account_failures(account)

    async def throttle(self, account: str) -> float:
        """Wait before answering a failed login of a throttled account; logs `event=throttle`. Returns the delay."""
        delay = self.auth_delay(account)
        if delay > 0:
            log_event(
                "throttle", logging.WARNING, user=account, failures=self.account_failures(account), delay=f"{delay:g}"
            )
            await asyncio.sleep(delay)
        return delay

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def banned_decision(ban: Ban) -> Decision:
    return Decision(
        False, 421, "4.7.0", f"Your address is banned for abuse until {utc_stamp(ban.until)}, try later", "banned"
    )


def guard_from_config(cfg: Config, store: BanStore, worker: int = 0) -> Guard:
    """The process's guard; only worker 0 drives the firewall hooks (one nft writer)."""
    return Guard(cfg, store, firewall=worker == 0)
