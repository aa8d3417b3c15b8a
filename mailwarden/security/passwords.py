"""Password hashing (argon2id) with bounded concurrency, and the password policy.

Each argon2id hash costs tens of MiB and hundreds of ms by design, so a burst
of AUTH attempts could exhaust memory or stall the event loop. Hashes run in
worker threads and a semaphore bounds how many run at once.
"""

from __future__ import annotations

import asyncio
import functools
import re
from importlib import resources

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

try:  # libsodium (pynacl, a dependency already): the same argon2id in ~2/3 of the reference code's CPU time
    import nacl.exceptions
    import nacl.pwhash.argon2id as _sodium_argon2id
except ImportError:  # pragma: no cover - pynacl is a declared dependency
    _sodium_argon2id = None

# Hashes libsodium verifies exactly as argon2-cffi does: argon2id, version 19, one lane (libsodium
# supports only parallelism 1), standard base64 salt and tag. Anything else goes to argon2-cffi.
_SODIUM_HASH = re.compile(r"\$argon2id\$v=19\$m=\d{1,9},t=\d{1,6},p=1\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{6,}")


class PasswordPolicyError(Exception):
    """The password breaks the policy; the message says which rule."""


@functools.cache
def common_passwords() -> frozenset[str]:
    text = resources.files(__package__).joinpath("common_passwords.txt").read_text()
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def check_policy(password: str, address: str, min_length: int) -> None:
    """Raise PasswordPolicyError unless `password` may be set for `address`."""
    if len(password) < min_length:
        raise PasswordPolicyError(f"password must be at least {min_length} characters")
    if len(password) > 1024:
        raise PasswordPolicyError("password must be at most 1024 characters")
    lowered = password.lower()
    local, _, domain = address.lower().partition("@")
    if local and local in lowered:
        raise PasswordPolicyError("password must not contain the user name")
    for label in (domain, domain.split(".")[0] if domain else ""):
        if len(label) >= 4 and label in lowered:
            raise PasswordPolicyError("password must not contain the domain name")
    if _is_pattern(lowered):
        raise PasswordPolicyError("password is a keyboard run, sequence or repetition")
    common = common_passwords()
    stripped = lowered.rstrip("0123456789!@#$%^&*.?-_ ")
    if lowered in common or (len(stripped) >= 6 and stripped in common):
        raise PasswordPolicyError("password is on the list of commonly used passwords")


_RUNS = (
    "01234567890123456789",
    "98765432109876543210",
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz",
    "qwertyuiopasdfghjklzxcvbnmqwertyuiopasdfghjklzxcvbnm",
    "qwertzuiopasdfghjklyxcvbnm",
    "azertyuiopqsdfghjklmwxcvbn",
    "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p",
)


def _is_pattern(lowered: str) -> bool:
    """Sequences (123456789012, abcdef...), keyboard runs and repetitions (abcabcabcabc)."""
    if any(lowered in run for run in _RUNS):
        return True
    n = len(lowered)
    return any(n % k == 0 and lowered == lowered[:k] * (n // k) for k in range(1, n // 2 + 1))


class PasswordHashing:
    """argon2id hashing and verification, at most `concurrency` at once."""

    def __init__(self, concurrency: int, time_cost: int, memory_kib: int) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1, type=Type.ID)
        self._slots = asyncio.Semaphore(concurrency)
        # A hash to verify against when the user does not exist, so a missing
        # account costs the same time as a wrong password.
        self._dummy = self._hasher.hash("mailwarden-no-such-user")

    def hash_sync(self, password: str) -> str:
        return self._hasher.hash(password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        async with self._slots:
            return await asyncio.to_thread(self._verify_sync, stored_hash, password)

    def _verify_sync(self, stored_hash: str | None, password: str) -> bool:
        target = stored_hash or self._dummy
        if _sodium_argon2id is not None and _SODIUM_HASH.fullmatch(target):
            # IMAP and SMTP AUTH verify on every login, so this is most of a session's CPU.
            try:
                return _sodium_argon2id.verify(target.encode(), password.encode("utf-8", "surrogatepass")) and (
                    stored_hash is not None
                )
            except nacl.exceptions.InvalidkeyError:
                return False
        try:
            return self._hasher.verify(target, password) and stored_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
