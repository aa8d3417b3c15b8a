"""Storage quotas: the sizes an admin writes, and which limit applies to an account.

A limit comes from the first of: the account's own quota (`user quota`), its
domain's (`domain quota`), `accounts.default_quota`. 0 means unlimited at any
level, so an account can be exempted inside a limited domain. Usage is the
`accounts.used_bytes` counter, kept by every transaction that adds or removes
messages (storage/sql.py), so a check costs one indexed read, never a SUM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailwarden.storage.interfaces import StorageError

MAX_SIZE_TEXT = 32  # characters of a size an admin may type
MAX_SIZE = 1 << 60  # 1 EiB: a bound well past any disk, and inside SQLite's 64-bit integers
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d{1,19})\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


class SizeError(ValueError):
    """A size that is not a number with an optional K/M/G/T unit."""


def parse_size(text: str) -> int:
    """Bytes of "500M", "2G", "1.5"-free whole sizes, "1048576" or "0"; units are binary (1K = 1024).

    Bounded (MAX_SIZE_TEXT characters, MAX_SIZE bytes) and strict: anything
    else raises SizeError with a message an admin can act on.
    """
    raw = text.strip()
    if len(raw) > MAX_SIZE_TEXT:
        raise SizeError(f"size too long: {raw[:MAX_SIZE_TEXT]!r}...")
    m = _SIZE.fullmatch(raw)
    if m is None:
        raise SizeError(
            f"not a size: {raw!r} (expected bytes or a number with K, M, G or T, e.g. 500M, 2G; 0 = unlimited)"
        )
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value > MAX_SIZE:
        raise SizeError(f"size too large: {raw!r}")
    return value


def format_size(n: int) -> str:
    """The shortest exact form parse_size reads back (1073741824 -> "1G", 1500 -> "1500")."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """An approximate size for people (1.4 MiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass(frozen=True)
class QuotaState:
    """One account's usage and the quotas that could apply to it (None = not set at that level)."""

    address: str
    used: int
    user_limit: int | None
    domain_limit: int | None

    def limit(self, default: int) -> int:
        """The limit in force, in bytes; 0 = unlimited."""
        if self.user_limit is not None:
            return self.user_limit
        if self.domain_limit is not None:
            return self.domain_limit
        return default

    def source(self) -> str:
        """Where the limit comes from: "user", "domain" or "default"."""
        return "user" if self.user_limit is not None else "domain" if self.domain_limit is not None else "default"

    def would_exceed(self, extra: int, default: int) -> bool:
        """True when storing `extra` more bytes would go over the limit (or the account is already at/over it)."""
        limit = self.limit(default)
        if not limit:
            return False
        if self.used >= limit:
            return True
        return self.used + extra > limit


class QuotaExceeded(StorageError):
    """Storing this would take the account over its quota; nothing was stored."""

    def __init__(self, state: QuotaState, extra: int, limit: int) -> None:
        super().__init__(f"over quota: {state.address} uses {state.used} of {limit} bytes, {extra} more would exceed")
        self.state = state
        self.extra = extra
        self.limit = limit
