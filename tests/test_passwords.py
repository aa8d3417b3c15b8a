"""Password policy and bounded argon2id hashing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mailwarden.security import passwords
from mailwarden.security.passwords import PasswordHashing, PasswordPolicyError, check_policy


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("short-pw", "at least 12"),
        ("password1234", "commonly used"),
        ("qwertyuiopasdfgh", "keyboard run"),
        ("abcabcabcabc", "repetition"),
        ("baseball2024!!", "commonly used"),
        ("my-alice-is-great-pw", "user name"),
        ("visit example.test now", "domain"),
        ("examplerules-2026!", "domain"),
    ],
)
def test_policy_refuses(password: str, why: str) -> None:
    with pytest.raises(PasswordPolicyError, match=why):
        check_policy(password, "alice@example.test", 12)


def test_policy_accepts_a_long_uncommon_passphrase() -> None:
    check_policy("violet kettle harbour 93", "alice@example.test", 12)


def test_hashes_are_argon2id_and_verify() -> None:
    hashing = PasswordHashing(concurrency=2, time_cost=1, memory_kib=8192)

    async def run() -> tuple[str, bool, bool, bool]:
        h = await hashing.hash("violet kettle harbour 93")
        return (
            h,
            await hashing.verify(h, "violet kettle harbour 93"),
            await hashing.verify(h, "violet kettle harbour 94"),
            await hashing.verify(None, "anything at all"),
        )

    h, good, bad, missing = asyncio.run(run())
    assert h.startswith("$argon2id$") and good and not bad and not missing


def test_no_more_hashes_run_at_once_than_configured() -> None:
    hashing = PasswordHashing(concurrency=2, time_cost=1, memory_kib=8192)
    running = 0
    peak = 0
    lock = threading.Lock()
    real = hashing._verify_sync

    def counting(h: str | None, pw: str) -> bool:
        """The real verification (libsodium or argon2-cffi), counting how many overlap."""
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real(h, pw)
        finally:
            with lock:
                running -= 1

    stored = hashing.hash_sync("violet kettle harbour 93")
    hashing._verify_sync = counting  # type: ignore[method-assign]

    async def burst() -> list[bool]:
        return await asyncio.gather(*(hashing.verify(stored, f"wrong guess number {i}") for i in range(12)))

    assert asyncio.run(burst()) == [False] * 12
    assert 1 <= peak <= 2  # without the bound, the default thread pool runs up to 6 at once


def test_libsodium_and_argon2_cffi_agree() -> None:
    """Verification takes libsodium's argon2id for the hashes it supports; the answers are argon2-cffi's."""
    from argon2 import PasswordHasher, Type

    hashing = PasswordHashing(concurrency=1, time_cost=2, memory_kib=8192)
    one_lane = hashing.hash_sync("violet kettle harbour 93")
    assert passwords._SODIUM_HASH.fullmatch(one_lane)  # the fast path is taken for what hash() makes
    two_lanes = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=2, type=Type.ID).hash(
        "violet kettle harbour 93"
    )
    assert not passwords._SODIUM_HASH.fullmatch(two_lanes)  # libsodium has one lane only: argon2-cffi verifies it
    for stored in (one_lane, two_lanes):
        assert hashing._verify_sync(stored, "violet kettle harbour 93")
        assert not hashing._verify_sync(stored, "violet kettle harbour 94")
        assert not hashing._verify_sync(stored, "")
        assert not hashing._verify_sync(stored[:-4] + "AAAA", "violet kettle harbour 93")  # a damaged tag
    assert not hashing._verify_sync("$argon2id$v=19$m=8192,t=1,p=1$c2FsdA$", "x")  # malformed: refused, no crash
    assert not hashing._verify_sync(None, "violet kettle harbour 93")
    unicode = hashing.hash_sync("pässwörd ünïcode 💌")
    assert hashing._verify_sync(unicode, "pässwörd ünïcode 💌") and not hashing._verify_sync(unicode, "passwort")
