"""Automatic bans: ban events counted per IP (or IPv6 network) and per account.

Why two keys: a password guesser on one IP is stopped by banning the IP, but a
spray against one account from many IPs must not lock the owner out, so an
account only gets *throttled* (its failed logins are answered slowly), never
refused. The owner logging in from a clean IP is answered at once.

Counters live in memory, per process, bounded (the oldest networks and
fingerprints are forgotten first). Bans live in storage (`guard_bans`), so they
survive a restart and every worker sees them: each process reloads the active
bans every `guard.sync_interval` seconds, and re-reads one network's row before
refusing it, so `mailwarden ban remove` takes effect at the next connection.

The clock is injected (`clock`), so tests move time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailwarden.config import GUARD_EVENTS, Config
from mailwarden.logs import log_event

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
BanHook = Callable[[Network, int], Awaitable[None]]
UnbanHook = Callable[[Network], Awaitable[None]]

MAX_ACCOUNTS = 100_000
MAX_FINGERPRINTS = 200_000


class BanStore(Protocol):
    """What bans need from storage (storage/sql.py implements it)."""

    async def guard_active_bans(self, now: float) -> list[Any]: ...
    async def guard_ban_get(self, network: str) -> Any: ...
    async def guard_ban_add(
        self, network: str, reason: str, events: int, now: float, durations: list[int], memory: float
    ) -> Any: ...
    async def guard_ban_set(self, network: str, until: float, reason: str, now: float) -> None: ...
    async def guard_ban_remove(self, network: str) -> bool: ...
    async def guard_ban_expire(self, now: float, memory: float) -> list[str]: ...
    async def guard_count_event(self, key: str, event: str, now: float, window: float) -> int: ...
    async def guard_forget_events(self, key: str, before: float) -> None: ...


def network_of(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, v6_prefix: int = 64) -> Network:
    """The unit bans and counters apply to: the IPv4 address, or the IPv6 /v6_prefix around it.

    IPv4-mapped IPv6 addresses (::ffff:192.0.2.1, from a dual-stack socket) count as the IPv4 address.
    """
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv4Network(addr)
    return ipaddress.IPv6Network((addr, v6_prefix), strict=False)


def parse_network(text: str) -> Network:
    """An IP or CIDR from the CLI or storage; raises ValueError."""
    return ipaddress.ip_network(text.strip(), strict=False)


def show_network(net: Network) -> str:
    """A single address without its /32 or /128 (what Fail2Ban's <HOST> matches); else the CIDR."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def parse_duration(text: str) -> int:
    """'600', '10m', '1h', '2d', '1w' -> seconds; raises ValueError."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    scale = units.get(text[-1:], 0)
    number = text[:-1] if scale else text
    scale = scale or 1
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"not a duration: {text!r} (e.g. 600, 10m, 1h, 2d)")
    return int(number) * scale


def utc_stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _prune(stamps: deque[float], since: float) -> None:
    """Drop timestamps older than `since` from the left of a time-ordered deque."""
    while stamps and stamps[0] < since:
        stamps.popleft()


@dataclass(frozen=True)
class BanPolicy:
    ip_window: float
    thresholds: dict[str, int]
    durations: list[int]
    memory: float
    account_window: float
    account_threshold: int
    throttle_delay: float
    throttle_max: float
    v6_prefix: int

    @classmethod
    def from_config(cls, cfg: Config) -> BanPolicy:
        thresholds = {e: 10**9 for e in GUARD_EVENTS}
        thresholds.update(cfg.get("guard.ip_thresholds"))
        return cls(
            ip_window=float(cfg.get("guard.ip_window")),
            thresholds=thresholds,
            durations=[int(d) for d in cfg.get("guard.ban_durations")],
            memory=float(cfg.get("guard.ban_memory")),
            account_window=float(cfg.get("guard.account_window")),
            account_threshold=cfg.get("guard.account_threshold"),
            throttle_delay=cfg.get("guard.throttle_delay"),
            throttle_max=cfg.get("guard.throttle_max"),
            v6_prefix=cfg.get("guard.ipv6_prefix"),
        )


@dataclass
class Ban:
    network: Network
    until: float
    reason: str


class _Bounded(OrderedDict[Any, Any]):
    """An LRU dict with a size bound: attackers with many IPs cannot grow our memory without limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: Any, default: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is None:
            value = default()
            self[key] = value
            if len(self) > self.limit:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


@dataclass
class BanBook:
    """Counts ban events and keeps the view of active bans for one process."""

    policy: BanPolicy
    store: BanStore
    is_allowed: Callable[[Network], bool] = lambda _net: False  # allow-listed on every listener: never banned
    clock: Callable[[], float] = time.time
    on_ban: list[BanHook] = field(default_factory=list)
    on_unban: list[UnbanHook] = field(default_factory=list)
    firewall: bool = True  # this process keeps the firewall in step (one process does, worker 0)
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _account_events: _Bounded = field(default_factory=lambda: _Bounded(MAX_ACCOUNTS))
    _seen: _Bounded = field(default_factory=lambda: _Bounded(MAX_FINGERPRINTS))
    _active: dict[Network, Ban] = field(default_factory=dict)
    _firewalled: set[Network] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ---- secrets --------------------------------------------------------

    def fingerprint(self, secret: bytes) -> bytes:
        """A keyed hash of a password (HMAC-SHA256 with a per-process random key), kept instead of it.

        It only tells "the same wrong password again" apart; it cannot be tested
        offline against a word list without the key, which never leaves memory.
        """
        return hmac.new(self._key, secret, hashlib.sha256).digest()[:16]

    # ---- counting ---------------------------------------------------------

    def network(self, ip: str) -> Network:
        return network_of(ip, self.policy.v6_prefix)

    async def record(
        self, event: str, ip: str, account: str | None = None, secret_fingerprint: bytes | None = None
    ) -> Ban | None:
        """Count one event; returns the ban it caused, if any. A repeat of the same failed
        secret for the same account from the same network counts once per window."""
        if event not in GUARD_EVENTS:
            raise ValueError(f"unknown guard event {event!r}")
        try:
            net = self.network(ip)
        except ValueError:
            return None
        now = self.clock()
        count_ip = True
        count_account = account is not None and event == "auth_fail"
        if secret_fingerprint is not None and account is not None:
            key = (net, account, secret_fingerprint)
            last = self._seen.get(key)
            if last is not None and now - last < max(self.policy.ip_window, self.policy.account_window):
                count_ip = count_account = False
            else:
                self._seen.touch(key, lambda: now)
                self._seen[key] = now
        # Counts live in storage, so every worker's events add up (a connection may land on any worker).
        if count_account and account is not None:
            failures = await self.store.guard_count_event(
                f"account:{account}", "auth_fail", now, self.policy.account_window
            )
            self._account_events.touch(account, lambda: (now, failures))  # bounded: the oldest accounts go
            self._account_events[account] = (now, failures)
        if not count_ip or self.is_allowed(net) or self.banned(net) is not None:
            return None
        count = await self.store.guard_count_event(str(net), event, now, self.policy.ip_window)
        if count < self.policy.thresholds.get(event, 10**9):
            return None
        return await self.ban(net, event, count)

    def account_failures(self, account: str) -> int:
        """Failed logins of `account` in the window, all workers', as of this process's last count of one."""
        seen = self._account_events.get(account)
        if not seen:
            return 0
        at, failures = seen
        return failures if self.clock() - at < self.policy.account_window else 0

    def auth_delay(self, account: str) -> float:
        """Seconds to wait before answering a failed login of `account` (0 below its threshold).

        Throttling, never a lockout: the delay doubles per failure past the
        threshold up to guard.throttle_max, and a correct password is still accepted.
        """
        failures = self.account_failures(account)
        over = failures - self.policy.account_threshold
        if over <= 0:
            return 0.0
        return min(self.policy.throttle_max, self.policy.throttle_delay * (2 ** min(over - 1, 30)))

    # ---- bans ---------------------------------------------------------------

    async def ban(self, net: Network, reason: str, events: int) -> Ban | None:
        """Ban `net` for the next duration of its escalation; logs `event=ban`."""
        async with self._lock:
            if self.banned(net) is not None:
                return None
            row = await self.store.guard_ban_add(
                str(net), reason, events, self.clock(), self.policy.durations, self.policy.memory
            )
            if row is None:  # another worker banned it first
                await self.refresh()
                return self.banned(net)
            ban = Ban(net, row.until, reason)
            self._active[net] = ban
        await self.store.guard_forget_events(
            str(net), self.clock() - max(self.policy.ip_window, self.policy.account_window)
        )
        log_event(
            "ban", logging.WARNING, ip=show_network(net), scope="ip", reason=reason, events=events,
            duration=row.duration, until=utc_stamp(row.until),
        )  # fmt: skip
        await self._sync_firewall()
        return ban

    def banned(self, net: Network) -> Ban | None:
        """The active ban covering `net`, from this process's view."""
        if not self._active:
            return None
        ban = self._active.get(net)
        if ban is None:
            for other, candidate in self._active.items():
                if other.version == net.version and net.subnet_of(other):  # type: ignore[arg-type]
                    ban = candidate
                    break
        if ban is None:
            return None
        return ban if ban.until > self.clock() else None

    async def confirm(self, ban: Ban) -> Ban | None:
        """Re-read a ban before refusing a connection for it, so `mailwarden ban remove` counts at the next one.

        One primary-key read per refused connection (~0.1 ms on the database
        thread); with guard.nftables on, a banned client's packets never get here.
        """
        row = await self.store.guard_ban_get(str(ban.network))
        if row is None or not row.active or row.until <= self.clock():
            self._active.pop(ban.network, None)
            return None
        return ban

    async def refresh(self) -> None:
        """Reload active bans from storage; end expired ones (one process logs each `event=unban`)."""
        now = self.clock()
        if self.firewall:  # one process (worker 0) also prunes every worker's stale ban events
            await self.store.guard_forget_events("", now - max(self.policy.ip_window, self.policy.account_window))
        for text in await self.store.guard_ban_expire(now, self.policy.memory):
            net = parse_network(text)
            log_event("unban", ip=show_network(net), reason="expired")
        rows = await self.store.guard_active_bans(now)
        active: dict[Network, Ban] = {}
        for row in rows:
            try:
                net = parse_network(row.network)
            except ValueError:
                continue
            active[net] = Ban(net, row.until, row.reason)
        self._active = active
        await self._sync_firewall()

    async def _sync_firewall(self) -> None:
        """Make the firewall hooks agree with the active bans (additions and removals)."""
        if not self.firewall or not (self.on_ban or self.on_unban):
            return
        now = self.clock()
        current = {net for net, ban in self._active.items() if ban.until > now}
        for net in sorted(current - self._firewalled, key=str):
            self._firewalled.add(net)
            seconds = max(1, int(self._active[net].until - now))
            for hook in self.on_ban:
                await _call_hook("on_ban", hook(net, seconds), net)
        for net in sorted(self._firewalled - current, key=str):
            self._firewalled.discard(net)
            for unhook in self.on_unban:
                await _call_hook("on_unban", unhook(net), net)


async def _call_hook(name: str, call: Awaitable[None], net: Network) -> None:
    """A firewall hook failing must never stop a ban: it is logged and the server goes on."""
    try:
        await call
    except Exception as exc:
        log_event(
            "firewall_error", logging.ERROR, hook=name, ip=show_network(net), error=f"{type(exc).__name__}: {exc}"
        )
