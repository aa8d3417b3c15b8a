"""MTA-STS (RFC 8461): a domain publishes over HTTPS which MX hosts are genuine and that TLS is required.

Discovery is the `_mta-sts.<domain>` TXT record (`v=STSv1; id=...`); the policy
itself is `https://mta-sts.<domain>/.well-known/mta-sts.txt`, fetched with
certificate validation (system CAs plus `delivery.ca_file`), no redirects, at
most 64 KiB, within `delivery.mta_sts_timeout`. The fetch is our own tiny
HTTP/1.1 GET over asyncio streams, because the policy host's address must come
from our resolver (the one `dns.servers` names), not from the system's.

Policies are cached in memory per domain for their max_age and refetched when
the TXT id changes. As RFC 8461 §3.3 and §5 require: a failed fetch keeps the
cached policy; with nothing cached, the domain is treated as having no policy
(a first contact cannot be protected, that is MTA-STS's trust-on-first-use).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass

from mailwarden.dns.resolver import DnsTempError, Resolver
from mailwarden.logs import log_event

MAX_POLICY_BYTES = 64 * 1024
MAX_HEAD_BYTES = 16 * 1024
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 §3.2: about a year
POLICY_PATH = "/.well-known/mta-sts.txt"
_CACHE_DOMAINS = 10_000

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9_]{1,32}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_MX_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")


class MtaStsError(Exception):
    """The policy could not be fetched or is not a valid policy."""


@dataclass(frozen=True)
class StsPolicy:
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]
    max_age: int
    id: str

    def matches(self, host: str) -> bool:
        """RFC 8461 §4.1: exact match, or "*.example.com" covering exactly one more left-most label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, _, rest = host.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parse_txt(texts: list[str]) -> str | None:
    """The policy id from the `_mta-sts` TXT records, or None if there is no valid one (RFC 8461 §3.1)."""
    candidates = [t for t in texts if t.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            return None
        fields.setdefault(key, value)
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(body: bytes, policy_id: str = "") -> StsPolicy:
    """A strict RFC 8461 §3.2 parse; MtaStsError says what is wrong."""
    if len(body) > MAX_POLICY_BYTES:
        raise MtaStsError(f"policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MtaStsError("policy is not UTF-8") from None
    single: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not _KEY.fullmatch(key):
            raise MtaStsError(f"line {number}: expected key: value")
        value = value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _MX_PATTERN.fullmatch(pattern):
                raise MtaStsError(f"line {number}: bad mx pattern {value[:80]!r}")
            mx.append(pattern)
        elif key in ("version", "mode", "max_age"):
            if key in single:
                raise MtaStsError(f"line {number}: {key} given twice")
            single[key] = value
        # other keys: ignored (RFC 8461 §3.2 extension fields)
    if single.get("version") != "STSv1":
        raise MtaStsError("version is not STSv1")
    mode = single.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise MtaStsError(f"mode must be enforce, testing or none, got {mode!r}")
    max_age_text = single.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", max_age_text):
        raise MtaStsError(f"max_age must be 1-10 digits, got {max_age_text[:20]!r}")
    if mode != "none" and not mx:
        raise MtaStsError(f"mode {mode} needs at least one mx line")
    return StsPolicy(mode, tuple(mx), min(int(max_age_text), MAX_AGE_LIMIT), policy_id)


async def fetch_policy(
    domain: str, resolver: Resolver, context: ssl.SSLContext, *, port: int = 443, timeout: float = 20.0
) -> bytes:
    """GET the policy body over HTTPS (certificate checked for mta-sts.<domain>); MtaStsError on any failure."""
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(timeout):
            try:
                addresses = await resolver.addresses(host)
            except DnsTempError as exc:
                raise MtaStsError(f"{host}: DNS: {exc.reason}") from None
            if not addresses:
                raise MtaStsError(f"{host} has no address")
            problems: list[str] = []
            for address in addresses:
                try:
                    return await _get(address, port, host, context)
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                    problems.append(f"{address}: {type(exc).__name__}: {exc}")
            raise MtaStsError(f"{host}: " + "; ".join(problems))
    except TimeoutError:
        raise MtaStsError(f"{host}: no policy within {timeout:g}s") from None


async def _get(address: str, port: int, host: str, context: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection(
        address, port, ssl=context, server_hostname=host, limit=MAX_HEAD_BYTES
    )
    try:
        request = (
            f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mailwarden\r\n"
            "Accept: text/plain\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise MtaStsError(f"{host}: not an HTTP response")
        if parts[1] != "200":
            # 3xx included: RFC 8461 §3.3 forbids following redirects.
            raise MtaStsError(f"{host}: HTTP status {parts[1]} (need 200; redirects are not followed)")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise MtaStsError(f"{host}: content type {ctype or 'missing'!r}, not text/plain")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(reader, host)
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise MtaStsError(f"{host}: bad Content-Length") from None
            if not 0 <= length <= MAX_POLICY_BYTES:
                raise MtaStsError(f"{host}: policy of {length} bytes is over {MAX_POLICY_BYTES}")
            return await reader.readexactly(length)
        body = await reader.read(MAX_POLICY_BYTES + 1)
        while body and len(body) <= MAX_POLICY_BYTES:
            more = await reader.read(MAX_POLICY_BYTES + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > MAX_POLICY_BYTES:
            raise MtaStsError(f"{host}: policy over {MAX_POLICY_BYTES} bytes")
        return body
    finally:
        writer.close()


async def _read_chunked(reader: asyncio.StreamReader, host: str) -> bytes:
    body = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise MtaStsError(f"{host}: bad chunk size") from None
        if size == 0:
            return body
        if len(body) + size > MAX_POLICY_BYTES:
            raise MtaStsError(f"{host}: policy over {MAX_POLICY_BYTES} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise MtaStsError(f"{host}: bad chunk framing")


@dataclass
class _Cached:
    policy: StsPolicy
    expires: float


class MtaSts:
    """Policies per recipient domain: discovered, fetched, cached; one fetch at a time per domain."""

    def __init__(self, resolver: Resolver, context: ssl.SSLContext, *, port: int = 443, timeout: float = 20.0) -> None:
        self.resolver = resolver
        self.context = context
        self.port = port
        self.timeout = timeout
        self.fetches = 0  # HTTPS fetches attempted (tests and metrics)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[StsPolicy | None]] = {}

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy in force for `domain`, or None. Never raises for a remote problem."""
        domain = domain.lower().rstrip(".")
        pending = self._inflight.get(domain)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[StsPolicy | None] = asyncio.get_running_loop().create_future()
        self._inflight[domain] = future
        try:
            result = await self._discover(domain)
            future.set_result(result)
            return result
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, no "never retrieved" warning
            raise
        finally:
            del self._inflight[domain]

    def _cached(self, domain: str) -> StsPolicy | None:
        entry = self._cache.get(domain)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self._cache[domain]
            return None
        return entry.policy

    async def _discover(self, domain: str) -> StsPolicy | None:
        cached = self._cached(domain)
        try:
            policy_id = parse_txt(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DnsTempError:
            return cached
        except ValueError:  # not a domain name DNS can carry
            return None
        if policy_id is None or (cached is not None and cached.id == policy_id):
            return cached  # no TXT: keep using an unexpired cached policy (RFC 8461 §3.3)
        self.fetches += 1
        try:
            body = await fetch_policy(domain, self.resolver, self.context, port=self.port, timeout=self.timeout)
            policy = parse_policy(body, policy_id)
        except MtaStsError as exc:
            log_event("mta_sts", logging.WARNING, domain=domain, result="fetch_failed", reason=str(exc))
            return cached
        self._cache[domain] = _Cached(policy, time.monotonic() + policy.max_age)
        self._cache.move_to_end(domain)
        while len(self._cache) > _CACHE_DOMAINS:
            self._cache.popitem(last=False)
        log_event("mta_sts", domain=domain, result="fetched", mode=policy.mode, id=policy_id, max_age=policy.max_age)
        return policy
