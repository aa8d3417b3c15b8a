"""Ban bookkeeping (security/bans.py) against a real SQLite store, with an injected clock instead of sleeps."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from mailwarden.security.bans import BanBook, BanPolicy, network_of, parse_duration, show_network
from mailwarden.storage.sql import SqlStore

BAN_LINE = re.compile(
    r"event=ban ip=(?P<ip>\S+) scope=ip reason=(?P<reason>\w+) events=(?P<events>\d+) "
    r"duration=(?P<duration>\d+) until=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def policy(**over: Any) -> BanPolicy:
    values: dict[str, Any] = dict(
        ip_window=600.0,
        thresholds={"auth_fail": 3, "unknown_user": 3, "relay": 3, "protocol": 3, "early_talker": 1, "scanner": 3},
        durations=[600, 3600, 86400],
        memory=7 * 86400.0,
        account_window=3600.0,
        account_threshold=2,
        throttle_delay=1.0,
        throttle_max=8.0,
        v6_prefix=64,
    )
    values.update(over)
    return BanPolicy(**values)


def run(tmp_path: Path, body: Any) -> Any:
    async def main() -> Any:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def ban_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    return [m for r in caplog.records if (m := BAN_LINE.search(r.getMessage()))]


def test_one_ip_is_banned_after_threshold_and_bans_grow(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    clock = Clock()

    async def body(store: SqlStore) -> list[float]:
        book = BanBook(policy(), store, clock=clock)
        durations = []
        for _round in range(3):
            for i in range(3):
                guess = book.fingerprint(b"pw%d-%d" % (_round, i))
                ban = await book.record("auth_fail", "192.0.2.7", f"user{i}@example.test", guess)
            assert ban is not None and book.banned(network_of("192.0.2.7")) is not None
            durations.append(ban.until - clock.now)
            clock.now = ban.until + 1  # the ban runs out
            await book.refresh()
            assert book.banned(network_of("192.0.2.7")) is None
        return durations

    assert run(tmp_path, body) == [600, 3600, 86400]
    lines = ban_lines(caplog)
    assert [(m["ip"], m["reason"], m["events"], m["duration"]) for m in lines] == [
        ("192.0.2.7", "auth_fail", "3", "600"),
        ("192.0.2.7", "auth_fail", "3", "3600"),
        ("192.0.2.7", "auth_fail", "3", "86400"),
    ]
    assert sum("event=unban ip=192.0.2.7 reason=expired" in r.getMessage() for r in caplog.records) == 3


def test_events_outside_the_window_do_not_add_up(tmp_path: Path) -> None:
    clock = Clock()

    async def body(store: SqlStore) -> Any:
        book = BanBook(policy(), store, clock=clock)
        for _ in range(5):
            assert await book.record("unknown_user", "192.0.2.8") is None or False
            clock.now += 400  # two events at most inside any 600 s window
        return book.banned(network_of("192.0.2.8"))

    assert run(tmp_path, body) is None


def test_same_wrong_password_counts_once_per_window(tmp_path: Path) -> None:
    clock = Clock()

    async def body(store: SqlStore) -> tuple[Any, Any, int]:
        book = BanBook(policy(), store, clock=clock)
        stale = book.fingerprint(b"old password")
        for _ in range(10):  # a phone with an old password, retrying
            await book.record("auth_fail", "192.0.2.9", "alice@example.test", stale)
        after_stale = book.banned(network_of("192.0.2.9"))
        failures = book.account_failures("alice@example.test")
        await book.record("auth_fail", "192.0.2.9", "alice@example.test", book.fingerprint(b"guess 1"))
        ban = await book.record("auth_fail", "192.0.2.9", "alice@example.test", book.fingerprint(b"guess 2"))
        return after_stale, ban, failures

    after_stale, ban, failures = run(tmp_path, body)
    assert after_stale is None and failures == 1
    assert ban is not None  # three different passwords: a guesser


def test_fingerprint_is_keyed_and_never_the_password() -> None:
    a = BanBook(policy(), store=None)  # type: ignore[arg-type]
    b = BanBook(policy(), store=None)  # type: ignore[arg-type]
    fp = a.fingerprint(b"hunter2")
    assert fp == a.fingerprint(b"hunter2") and fp != a.fingerprint(b"hunter3")
    assert fp != b.fingerprint(b"hunter2")  # a per-process key: not a plain hash anyone can precompute
    assert b"hunter2" not in fp and len(fp) == 16


def test_ipv6_is_counted_and_banned_per_64(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    clock = Clock()

    async def body(store: SqlStore) -> tuple[bool, bool, bool]:
        book = BanBook(policy(), store, clock=clock)
        for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"):  # one /64, three addresses
            await book.record("protocol", host)
        same = book.banned(network_of("2001:db8:1:2:abcd::9")) is not None
        other = book.banned(network_of("2001:db8:1:3::1")) is not None
        v4 = book.banned(network_of("::ffff:192.0.2.1")) is not None
        return same, other, v4

    assert run(tmp_path, body) == (True, False, False)
    assert [m["ip"] for m in ban_lines(caplog)] == ["2001:db8:1:2::/64"]
    assert str(network_of("::ffff:192.0.2.1")) == "192.0.2.1/32"  # a mapped address is its IPv4 address
    assert show_network(network_of("2001:db8::1", 128)) == "2001:db8::1"


def test_account_is_throttled_more_and_more_but_never_banned(tmp_path: Path) -> None:
    clock = Clock()

    async def body(store: SqlStore) -> tuple[list[float], bool]:
        book = BanBook(policy(), store, clock=clock)
        delays = []
        for i in range(7):  # a spray: one guess per IP
            await book.record("auth_fail", f"198.51.100.{i}", "alice@example.test", book.fingerprint(b"g%d" % i))
            delays.append(book.auth_delay("alice@example.test"))
        any_ban = any(book.banned(network_of(f"198.51.100.{i}")) for i in range(7))
        return delays, any_ban

    delays, any_ban = run(tmp_path, body)
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 8.0]  # doubling past the threshold, capped at throttle_max
    assert not any_ban


def test_allow_listed_network_is_never_banned(tmp_path: Path) -> None:
    allowed = ipaddress.ip_network("192.0.2.0/24")

    async def body(store: SqlStore) -> Any:
        book = BanBook(policy(), store, is_allowed=lambda net: net.subnet_of(allowed), clock=Clock())  # type: ignore[arg-type]
        for i in range(10):
            await book.record("auth_fail", "192.0.2.10", "x@example.test", book.fingerprint(b"%d" % i))
        return book.banned(network_of("192.0.2.10")), await store.guard_active_bans(0)

    ban, rows = run(tmp_path, body)
    assert ban is None and rows == []


def test_other_workers_see_a_ban_and_firewall_hooks_follow(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    calls: list[tuple[str, str, int]] = []

    async def on_ban(net: Any, seconds: int) -> None:
        calls.append(("ban", str(net), seconds))
        raise RuntimeError("nft is not there")  # a broken firewall must not stop the ban

    async def on_unban(net: Any) -> None:
        calls.append(("unban", str(net), 0))

    async def body(store: SqlStore) -> tuple[Any, Any]:
        worker1 = BanBook(policy(), store, clock=clock, firewall=False)
        worker0 = BanBook(policy(), store, clock=clock, on_ban=[on_ban], on_unban=[on_unban])
        for i in range(3):
            await worker1.record("relay", "203.0.113.5", None, None)
            del i
        before = worker0.banned(network_of("203.0.113.5"))
        await worker0.refresh()  # what its sync task does every guard.sync_interval
        seen = worker0.banned(network_of("203.0.113.5"))
        clock.now += 601
        await worker0.refresh()
        return before, seen

    before, seen = run(tmp_path, body)
    assert before is None and seen is not None
    assert calls == [("ban", "203.0.113.5/32", 600), ("unban", "203.0.113.5/32", 0)]
    assert any("event=firewall_error hook=on_ban" in r.getMessage() for r in caplog.records)


def test_durations_parse() -> None:
    assert [parse_duration(t) for t in ("600", "10m", "1h", "2d", "1w")] == [600, 600, 3600, 172800, 604800]
    for bad in ("", "-5", "1y", "h", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
