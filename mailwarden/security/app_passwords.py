"""App passwords: server-generated secrets a mail client logs in with instead of the account password.

Each is 16 characters from [a-z0-9] (~82 bits) shown as four groups of four,
stored as an argon2id hash like an account password, and revocable by name.
A login succeeds with the account password or any of the user's app passwords;
for users and domains in `accounts.require_app_passwords` the account password
is refused on IMAP and SMTP.

Timing: the account password (or, for an unknown user, a dummy hash) is always
verified first, exactly as before. Only a password shaped like an app password
is then tried against the user's app passwords, at most APP_PASSWORD_MAX of
them, stopping at the first match.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from mailwarden.security.passwords import PasswordHashing

APP_PASSWORD_MAX = 20  # per user: bounds the hashes one failed login can cost
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_GROUPS, _GROUP_LEN = 4, 4
MAX_NAME = 64


def generate() -> str:
    """A new app password as shown to the user, e.g. 'k3xq-9pzr-m2wa-t7cn'."""
    return "-".join("".join(secrets.choice(ALPHABET) for _ in range(_GROUP_LEN)) for _ in range(_GROUPS))


def normalize(password: str) -> str | None:
    """The 16 characters that are hashed, or None if `password` cannot be an app password.

    Dashes and spaces are ignored and case folded, so a pasted or retyped
    password works.
    """
    s = password.replace("-", "").replace(" ", "").lower()
    if len(s) != _GROUPS * _GROUP_LEN or any(c not in ALPHABET for c in s):
        return None
    return s


def required_for(entries: list[str], login: str) -> bool:
    """Whether `accounts.require_app_passwords` (users and/or domains) names this login."""
    if not entries:
        return False
    wanted = {e.strip().lower().lstrip("@") for e in entries}
    domain = login.rpartition("@")[2]
    return login in wanted or (bool(domain) and domain in wanted)


@dataclass(frozen=True)
class LoginCheck:
    ok: bool
    reason: str | None = None  # why a failure failed, for the log only (never told to the client)


MAX_LOGIN = 320  # an address
MAX_PASSWORD = 1024  # longer is refused unhashed: argon2 over megabytes would be a free CPU burn


async def check_credentials(
    hashing: PasswordHashing, store: Any, config: Any, login_b: bytes, password_b: bytes | None
) -> tuple[str, LoginCheck]:
    """The normalized login and its check, from the bytes a client sent (IMAP LOGIN/AUTHENTICATE, SMTP AUTH).

    One place for what every protocol needs first: decoding, lowercasing, and
    refusing oversize input without hashing it.
    """
    login = login_b.decode("utf-8", "replace").strip().lower()
    if password_b is None or len(login) > MAX_LOGIN or len(password_b) > MAX_PASSWORD:
        return login, LoginCheck(False)
    return login, await check_login(hashing, store, config, login, password_b.decode("utf-8", "replace"))


async def check_login(hashing: PasswordHashing, store: Any, config: Any, login: str, password: str) -> LoginCheck:
    """Verify a login against the account password and the user's app passwords."""
    account = await store.get_account(login)
    main_ok = await hashing.verify(account.password_hash if account else None, password)
    if account is None:
        return LoginCheck(False)
    if main_ok:
        if required_for(config.get("accounts.require_app_passwords"), login):
            return LoginCheck(False, "app_password_required")
        return LoginCheck(True)
    candidate = normalize(password)
    lookup = getattr(store, "app_password_hashes", None)
    if candidate is None or lookup is None:
        return LoginCheck(False)
    for app_id, stored in (await lookup(login))[:APP_PASSWORD_MAX]:
        if await hashing.verify(stored, candidate):
            await store.touch_app_password(app_id, time.time())
            return LoginCheck(True, None)
    return LoginCheck(False)
