"""Per-domain signing keys: one RSA-2048 and one Ed25519 key per domain, each under its own selector.

Both are made when a domain is added (and, for domains from before keys
existed, when the server starts). RSA-2048 is what every verifier checks;
Ed25519 (RFC 8463) is the modern one, and a message signed with both passes
wherever either is understood. ARC seals (RFC 8617) are RSA only, so they use
the RSA key. The selector names the date and algorithm (`mw20261129r`,
`mw20261129e`), so rotation can add new selectors without guessing
(a second rotation on one day gets `mw20261129n1r`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailwarden.logs import log_event
from mailwarden.storage.interfaces import SigningKey

RSA_BITS = 2048


def new_key_set(domain: str, taken: Sequence[str] = (), now: float | None = None) -> list[SigningKey]:
    """A fresh RSA and Ed25519 key for `domain`, with selectors not in `taken`."""
    now = time.time() if now is None else now
    base = "mw" + time.strftime("%Y%m%d", time.gmtime(now))
    n = 0
    while True:
        stem = base if n == 0 else f"{base}n{n}"
        if f"{stem}r" not in taken and f"{stem}e" not in taken:
            break
        n += 1
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_public = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return [
        SigningKey(
            domain,
            f"{stem}r",
            "rsa-sha256",
            rsa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            ).decode("ascii"),
            f"v=DKIM1; k=rsa; p={base64.b64encode(rsa_public).decode('ascii')}",
            now,
        ),
        SigningKey(
            domain,
            f"{stem}e",
            "ed25519-sha256",
            # dkimpy signs Ed25519 with the raw 32-byte seed, base64-encoded.
            base64.b64encode(
                ed_key.private_bytes(
                    serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
                )
            ).decode("ascii"),
            f"v=DKIM1; k=ed25519; p={base64.b64encode(ed_public).decode('ascii')}",
            now,
        ),
    ]


def record_name(key: SigningKey) -> str:
    return f"{key.selector}._domainkey.{key.domain}"


def zone_lines(keys: Sequence[SigningKey]) -> list[str]:
    """Zone-file lines for the keys, the TXT value split into 255-byte strings as DNS requires."""
    lines = []
    for key in keys:
        value = key.public_txt
        chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
        lines.append(f"{record_name(key)}. IN TXT ( {chunks} )")
    return lines


def rsa_key(keys: Sequence[SigningKey]) -> SigningKey | None:
    """The RSA key among `keys` (ARC seals are RSA only)."""
    return next((k for k in keys if k.algorithm == "rsa-sha256"), None)


async def ensure_signing_keys(store: SigningKeyStore, domains: Sequence[str]) -> dict[str, list[SigningKey]]:
    """Give every domain in `domains` that has no active key a new key set; returns the keys made.

    Runs at every start (and `init`, `domain add`), so it also retires the keys
    whose rotation overlap has ended.
    """
    await retire_due(store)
    made: dict[str, list[SigningKey]] = {}
    for domain in domains:
        existing = await store.signing_keys(domain)
        if any(k.state == "active" for k in existing):
            continue
        keys = new_key_set(domain, taken=[k.selector for k in existing])
        await store.add_signing_keys(keys)
        made[domain] = keys
    return made


class SigningKeyStore(Protocol):
    async def signing_keys(self, domain: str) -> list[SigningKey]: ...
    async def add_signing_keys(self, keys: list[SigningKey]) -> None: ...
    async def rotate_signing_keys(
        self, domain: str, new_keys: list[SigningKey], retire_at: float
    ) -> list[SigningKey]: ...
    async def retire_signing_keys(self, now: float) -> list[SigningKey]: ...


# ---- rotation -------------------------------------------------------------------
#
# A rotation publishes a new key set and starts signing with it at once; the
# old keys stay published ("retiring") for the overlap, because mail signed
# with them may still be in a queue, here or at the receiver, and DNS caches
# hold the old records. After the overlap they are "retired": nothing
# verifies with them any more, and the administrator removes the records.

DAY = 86400.0
RETIRE_CHECK_INTERVAL = 3600.0  # how often a running server retires keys past their overlap


@dataclass(frozen=True)
class Rotation:
    domain: str
    new: list[SigningKey]  # active now: publish
    retiring: list[SigningKey]  # keep published until retire_at, then remove
    retire_at: float


async def rotate(store: SigningKeyStore, domain: str, overlap_days: int, now: float | None = None) -> Rotation:
    """A new active key set for `domain`; its active keys become retiring for `overlap_days`."""
    now = time.time() if now is None else now
    await retire_due(store, now)
    existing = await store.signing_keys(domain)
    new = new_key_set(domain, taken=[k.selector for k in existing], now=now)
    retire_at = now + overlap_days * DAY
    retiring = await store.rotate_signing_keys(domain, new, retire_at)
    log_event(
        "dkim_rotated",
        domain=domain,
        selectors=",".join(k.selector for k in new),
        retiring=",".join(k.selector for k in retiring) or None,
        retire_at=int(retire_at),
    )
    return Rotation(domain, new, retiring, retire_at)


async def retire_due(store: SigningKeyStore, now: float | None = None) -> list[SigningKey]:
    """Retiring keys whose overlap has ended become retired; returns them (each is logged)."""
    retired = await store.retire_signing_keys(time.time() if now is None else now)
    for key in retired:
        log_event("dkim_key_retired", domain=key.domain, selector=key.selector)
    return retired


async def retire_periodically(store: SigningKeyStore, interval: float = RETIRE_CHECK_INTERVAL) -> None:
    """Run `retire_due` every `interval` seconds until cancelled (a task of the running server)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await retire_due(store)
        except Exception as exc:  # a failed housekeeping pass is retried at the next one
            log_event("dkim_retire_failed", logging.ERROR, error=type(exc).__name__)


def published(keys: Sequence[SigningKey]) -> list[SigningKey]:
    """The keys whose records must be in DNS: active and retiring."""
    return [k for k in keys if k.state in ("active", "retiring")]


def removable(keys: Sequence[SigningKey]) -> list[SigningKey]:
    """Retired keys: their records can be removed."""
    return [k for k in keys if k.state == "retired"]
