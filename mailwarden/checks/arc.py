"""ARC (RFC 8617): verify the chain a message arrived with, and seal what we forward.

Verification uses dkimpy's `ARC.verify`, which is synchronous and asks its
`dnsfunc` for each key as it goes. We cannot await inside it, so every key the
chain names (the s=/d= of each ARC-Seal and ARC-Message-Signature) is fetched
first through our resolver, concurrently; dkimpy then reads the answers from a
dict. A key lookup that failed temporarily is remembered: if the chain then
does not pass, the result is `temperror` (try again later) rather than a
verdict built on an outage.

Sealing builds the ARC set itself on dkimpy's primitives instead of calling
`dkim.arc_sign`: that one re-parses Authentication-Results with the `authres`
package and rewrites them, dropping comments, while RFC 8617 §4.1.1 wants the
ARC-Authentication-Results to be a copy of what we concluded.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key
from dkim.util import parse_tag_value

from mailwarden.checks.dkim import DOMAIN_TAG, ar_value, load
from mailwarden.checks.offload import run_cpu_bound
from mailwarden.checks.result import CheckResult
from mailwarden.dns import eager
from mailwarden.dns.resolver import DnsTempError, QueryCounter, Resolver

log = logging.getLogger(__name__)

# dkimpy logs every broken signature at ERROR; hostile mail would flood the log.
# Its findings come back to us as data, so its own logger stays quiet.
_LIB_LOG = logging.getLogger("mailwarden.checks.arc.dkimpy")
_LIB_LOG.setLevel(logging.CRITICAL)
_LIB_LOG.propagate = False

_MAX_INSTANCE = 50  # RFC 8617 §4.2.1: i= is 1..50
_MAX_KEY_LOOKUPS = 2 * _MAX_INSTANCE  # one AS key and one AMS key per set
_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_CV_IN_RESULTS = re.compile(r"(?:^|;)\s*arc\s*=\s*(pass|fail|none)\b", re.IGNORECASE)


class ArcSealRefused(ValueError):
    """No ARC set may be added to this message; forward it unsealed."""


@dataclass(frozen=True)
class ArcInstance:
    """One ARC set as verified (RFC 8617 §4.1)."""

    instance: int
    seal_domain: str  # the ARC-Seal's d=: who sealed this hop
    seal_selector: str
    signature_domain: str  # the ARC-Message-Signature's d=
    cv: str  # the cv= this sealer claimed
    seal_valid: bool
    signature_valid: bool


async def evaluate_arc(
    message: bytes,
    resolver: Resolver,
    *,
    trusted_sealers: Collection[str] = (),
    remote_ip: str | None = None,
) -> CheckResult:
    """Validate the ARC chain (RFC 8617 §5.2): result pass, fail, none, or temperror."""
    started = time.monotonic()
    counter = QueryCounter()
    try:
        found = await _verify(message, resolver, counter)
    except Exception as exc:  # hostile input must never take the pipeline down
        log.warning("event=arc_internal_error error=%s", type(exc).__name__, exc_info=True)
        found = _Verdict("fail", f"could not evaluate the ARC chain ({type(exc).__name__})", [], False)
    cv, reason, instances = found.cv, found.reason, found.instances
    result = "temperror" if found.temporary and cv != "pass" else cv
    if found.temporary and cv != "pass":
        reason = f"{reason}; a key lookup failed temporarily"

    sealers = [i.seal_domain for i in instances]  # newest first
    trusted = {_domain(t) for t in trusted_sealers}
    override = cv == "pass" and bool(sealers) and sealers[0] in trusted
    comment = ""
    if cv == "pass" and instances:
        comment = f" (i={instances[0].instance} d={ar_value(sealers[0])})"
    elif result == "temperror":
        comment = " (temporary key lookup failure)"
    entry = f"arc={cv}{comment}"
    if remote_ip:
        entry += f" smtp.remote-ip={ar_value(remote_ip)}"
    return CheckResult(
        check="arc",
        result=result,
        reason=reason,
        auth_results=(entry,),
        details={
            "cv": cv,
            "sealers": sealers,
            "instances": instances,
            "trusted_override": override,
        },
        elapsed=time.monotonic() - started,
        dns_lookups=counter.lookups,
    )


@dataclass
class _Verdict:
    cv: str
    reason: str
    instances: list[ArcInstance]
    temporary: bool


_ARC_FIELD = re.compile(rb"(?im)^arc-(?:seal|message-signature|authentication-results):")
_END_OF_HEADER = re.compile(rb"\n\r?\n")


def has_arc_fields(message: bytes) -> bool:
    """Whether the header section has any ARC field, as dkimpy would find it.

    Most mail has none, and dkimpy canonicalizes every header before it looks;
    this scan answers "none" for that mail at a fraction of the cost. Field
    names never contain white space (see `split_message`), so the name is
    followed by the colon at once; the header section ends at the first
    empty line, with or without CR.
    """
    end = _END_OF_HEADER.search(message)
    return _ARC_FIELD.search(message, 0, end.start() + 1 if end else len(message)) is not None


async def _verify(message: bytes, resolver: Resolver, counter: QueryCounter) -> _Verdict:
    if not has_arc_fields(message):
        return _Verdict("none", "no ARC sets", [], False)
    arc = dkim.ARC(None, logger=_LIB_LOG, minkey=1024)
    try:
        load(arc, message)
    except Exception as exc:
        if not re.search(rb"(?im)^arc-(?:seal|message-signature|authentication-results)[ \t]*:", message):
            return _Verdict("none", "no ARC sets", [], False)
        return _Verdict("fail", f"the header section cannot be parsed: {_short(exc)}", [], False)
    max_instance, sets = arc.sorted_arc_headers()
    if max_instance == 0:
        return _Verdict("none", "no ARC sets", [], False)
    if max_instance > _MAX_INSTANCE:  # RFC 8617 §5.2 step 1: i= above 50 fails the chain
        return _Verdict("fail", f"i={max_instance} exceeds the limit of {_MAX_INSTANCE}", [], False)

    keys = await _fetch_keys(sets, resolver, counter)
    temporary: list[str] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        answer = keys.get(name.rstrip(b".").lower())
        if isinstance(answer, DnsTempError):
            temporary.append(str(answer))
            raise dkim.DnsTimeoutError(str(answer))
        return answer

    try:
        cv, data, reason = await run_cpu_bound(len(message), lambda: arc.verify(dnsfunc))
    except Exception as exc:  # dkimpy raises more than DKIMException on broken sets (e.g. IndexError)
        return _Verdict("fail", f"malformed ARC set: {_short(exc)}", [], bool(temporary))
    instances = [_instance(d) for d in data]
    if cv is None:
        # dkimpy's "chain terminated": a sealer already said cv=fail. RFC 8617 §5.2 step 2: that is a fail.
        cv = dkim.CV_Fail
    return _Verdict(cv.decode("ascii"), reason, instances, bool(temporary))


async def _fetch_keys(
    sets: list[tuple[int, tuple[bytes, bytes]]], resolver: Resolver, counter: QueryCounter
) -> dict[bytes, bytes | DnsTempError | None]:
    names: list[bytes] = []
    for _instance_no, (field, value) in sets:
        if field.lower() == b"arc-authentication-results":
            continue
        try:
            tags = parse_tag_value(value)
        except Exception:
            continue  # dkimpy reports the syntax error itself
        s, d = tags.get(b"s"), tags.get(b"d")
        if s and d and DOMAIN_TAG.fullmatch(s) and DOMAIN_TAG.fullmatch(d):
            name = (s + b"._domainkey." + d).lower()
            if name not in names:
                names.append(name)
    names = names[:_MAX_KEY_LOOKUPS]
    answers = await eager.gather(*(_fetch_key(n, resolver, counter) for n in names))
    return dict(zip(names, answers, strict=True))


async def _fetch_key(name: bytes, resolver: Resolver, counter: QueryCounter) -> bytes | DnsTempError | None:
    try:
        texts = await resolver.txt(name.decode("ascii"), counter)
    except DnsTempError as exc:
        return exc
    except (ValueError, UnicodeDecodeError):
        return None  # not a DNS name: no key
    # RFC 6376 §3.6.2.2: one key record per selector is expected; with several, use the first.
    return texts[0].encode("utf-8") if texts else None


def _instance(data: dict[str, Any]) -> ArcInstance:
    def text(key: str) -> str:
        value = data.get(key)
        return value.decode("ascii", "replace").lower() if isinstance(value, bytes) else ""

    return ArcInstance(
        instance=int(data.get("instance", 0)),
        seal_domain=_domain(text("as-domain")),
        seal_selector=text("as-selector"),
        signature_domain=_domain(text("ams-domain")),
        cv=text("cv"),
        seal_valid=bool(data.get("as-valid")),
        signature_valid=bool(data.get("ams-valid")),
    )


# ---- sealing ----------------------------------------------------------------


def arc_seal(
    message: bytes,
    auth_results: str,
    *,
    domain: str,
    selector: str,
    private_key_pem: bytes | str,
    srv_id: str,
    sign_headers: Sequence[str] | None = None,
    timestamp: int | None = None,
) -> bytes:
    """Return `message` with a new ARC set (AAR, AMS, AS) prepended (RFC 8617 §5.1).

    `auth_results` is what this ADMD concluded, the resinfo part of our
    Authentication-Results (e.g. "spf=pass smtp.mailfrom=…; dkim=pass …;
    arc=pass"); an authserv-id prefix equal to `srv_id` is tolerated. Its arc=
    entry gives the cv= of the seal; without one the message must carry no
    chain yet (cv=none). Raises ArcSealRefused (a ValueError) when no set may
    be added, and ValueError for unusable arguments.
    """
    results = auth_results.strip()
    if results.lower().startswith(srv_id.lower() + ";"):
        results = results[len(srv_id) + 1 :].strip()
    results = re.sub(r"\r?\n(?=[ \t])", "", results)  # unfold
    if re.search(r"[\r\n]", results) or re.search(r"[\r\n;]", srv_id):
        raise ValueError("auth_results and srv_id must be single header field values")
    key = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem
    sealer = _Sealer(None, logger=_LIB_LOG)
    load(sealer, message)
    new_set = sealer.seal(
        selector=selector.encode("ascii"),
        domain=domain.encode("ascii"),
        privkey=key,
        srv_id=srv_id.encode("utf-8"),
        results=results.encode("utf-8"),
        include_headers=[h.encode("ascii").lower() for h in sign_headers] if sign_headers else None,
        timestamp=timestamp,
    )
    return b"".join(new_set) + message


class _Sealer(dkim.ARC):
    """`dkim.ARC.sign` without the authres round trip (see the module docstring)."""

    def seal(
        self,
        *,
        selector: bytes,
        domain: bytes,
        privkey: bytes,
        srv_id: bytes,
        results: bytes,
        include_headers: list[bytes] | None,
        timestamp: int | None,
    ) -> list[bytes]:
        try:
            pk = parse_pem_private_key(privkey)
        except Exception as exc:
            raise ValueError(f"unusable ARC private key: {exc}") from None
        max_instance, existing = self.sorted_arc_headers()
        instance = max_instance + 1 if existing else 1
        if instance > _MAX_INSTANCE:
            raise ArcSealRefused(f"the ARC chain already has {max_instance} sets; RFC 8617 allows {_MAX_INSTANCE}")

        if _newest_seal_cv(existing, max_instance) == dkim.CV_Fail:
            # RFC 8617 §5.1.2: a chain that a sealer already declared failed gets no further sets.
            raise ArcSealRefused(f"ARC-Seal i={max_instance} already says cv=fail")

        claimed = _CV_IN_RESULTS.findall(results.decode("utf-8", "replace"))
        if len({c.lower() for c in claimed}) > 1:
            cv = dkim.CV_Fail
        elif claimed:
            cv = claimed[0].lower().encode("ascii")
        elif instance == 1:
            cv = dkim.CV_None
        else:
            raise ArcSealRefused("auth_results has no arc= result for the chain this message carries")
        if instance == 1 and cv != dkim.CV_None:
            cv = dkim.CV_None  # nothing to validate: RFC 8617 §4.1.3 requires cv=none on i=1
        if instance > 1 and cv == dkim.CV_None:
            raise ArcSealRefused("arc=none in auth_results, but the message carries an ARC chain")

        if include_headers is None:
            include_headers = [h.lower() for h in self.default_sign_headers()]
        include_headers = [h for h in include_headers if h not in _ARC_FIELDS and h != b"authentication-results"]
        if b"from" not in include_headers:
            raise ValueError("the From header field must be signed")

        # RFC 8617 §5.1.1: after a failed chain, the seal covers only our own set.
        arc_headers = [header for _i, header in existing] if cv != dkim.CV_Fail else []
        canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        new_set: list[bytes] = []

        aar_value = b"i=%d; " % instance + srv_id + b"; " + results + self.linesep
        new_set.append(b"ARC-Authentication-Results: " + aar_value)
        arc_headers.insert(0, (b"ARC-Authentication-Results", aar_value))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers

        self.hasher = dkim.HASH_ALGORITHMS[self.signature_algorithm]
        bodyhash = base64.b64encode(self.hasher(canon.canonicalize_body(self.body)).digest())
        stamp = str(timestamp if timestamp is not None else int(time.time())).encode("ascii")
        ams_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"a", self.signature_algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"s", selector),
            (b"t", stamp),
            (b"h", b":".join(include_headers)),
            (b"bh", bodyhash),
            (b"b", b"0" * 60),
        ]
        ams = self.gen_header(ams_fields, include_headers, canon, b"ARC-Message-Signature", pk, True)
        new_set.append(b"ARC-Message-Signature: " + _fold(ams) + self.linesep)
        arc_headers.insert(0, (b"ARC-Message-Signature", ams))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers

        as_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"cv", cv),
            (b"a", self.signature_algorithm),
            (b"d", domain),
            (b"s", selector),
            (b"t", stamp),
            (b"b", b"0" * 60),
        ]
        as_include = [name.lower() for name, _value in arc_headers]
        as_include.reverse()
        if cv == dkim.CV_Fail:
            self.headers.reverse()  # select_headers then finds our new set, not the older ones
        seal = self.gen_header(as_fields, as_include, canon, b"ARC-Seal", pk, True)
        new_set.append(b"ARC-Seal: " + _fold(seal) + self.linesep)
        new_set.reverse()
        return new_set


def _newest_seal_cv(existing: list[tuple[int, tuple[bytes, bytes]]], instance: int) -> bytes | None:
    for i, (name, value) in existing:
        if i == instance and name.lower() == b"arc-seal":
            try:
                return parse_tag_value(value).get(b"cv", b"").lower()
            except Exception:
                return None
    return None


def _fold(value: bytes) -> bytes:
    """Fold a standardized (single-line) tag list at its "; " separators; relaxed canonicalization ignores this."""
    value = value.strip()
    out, line = [], b""
    for part in value.split(b"; "):
        piece = part if not line else b"; " + part
        if line and len(line) + len(piece) > 76:
            out.append(line + b";")
            line = part
        else:
            line += piece
    out.append(line)
    return b"\r\n\t".join(out)


def _domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _short(exc: BaseException) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(exc)) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"
