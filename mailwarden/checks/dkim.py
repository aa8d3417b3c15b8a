"""DKIM verification (RFC 6376, RFC 8301, RFC 8463): every signature, reported on its own.

dkimpy does the canonicalization and the cryptography. Its verify entry points
answer one signature with True/False and log the why; we need the why as data
(DMARC uses each `(result, d=)` pair, Authentication-Results one entry per
signature), so this module drives dkimpy's steps itself:

1. parse each DKIM-Signature (syntax errors are `permerror`);
2. fetch every key through our resolver, concurrently (`DnsTempError` is
   `temperror`, no key is `permerror`); dkimpy's async support needs aiodns,
   and the lookup is the only part that waits, so only it is async;
3. let dkimpy check body hash and signature (`verify_sig_process`), in a thread
   since canonicalizing a large body is CPU work;
4. apply our policy on a cryptographically good signature: RSA below 1024
   bits and rsa-sha1 (RFC 8301 §3.1, §3.2), and an l= that leaves part of the
   body unsigned, are `policy`, never `pass`.
"""

from __future__ import annotations

import binascii
import functools
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import parse_tag_value

from mailwarden.checks.offload import run_cpu_bound
from mailwarden.checks.result import CheckResult
from mailwarden.dns import eager
from mailwarden.dns.resolver import DnsTempError, QueryCounter, Resolver

log = logging.getLogger(__name__)


# dkimpy logs every bad signature at ERROR; hostile mail would flood the log.
# Its findings come back to us as data, so its own logger stays quiet.
def _openssl_rsa_verify(digest: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """RSASSA-PKCS1-v1_5 verification by OpenSSL (cryptography) instead of dkimpy's pure-Python
    big-integer code: the same answer (a test compares them), about 0.3 ms less per signature."""
    algorithm = _HASHES.get(digest.name)
    if algorithm is None:
        return _PURE_PYTHON_VERIFY(digest, signature, public_key)
    try:
        key = _rsa_public_key(public_key["publicExponent"], public_key["modulus"])
        key.verify(signature, digest.digest(), padding.PKCS1v15(), Prehashed(algorithm))
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _rsa_public_key(exponent: int, modulus: int) -> rsa.RSAPublicKey:
    """Keys repeat (a sender signs all its mail with one): building the OpenSSL key once saves a third of a verify."""
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}
_PURE_PYTHON_VERIFY = dkim.RSASSA_PKCS1_v1_5_verify
dkim.RSASSA_PKCS1_v1_5_verify = _openssl_rsa_verify  # dkimpy looks the name up in its module at call time

# dkimpy blanks b= in the signature field with RE_BTAG before hashing it, a regex
# whose nested optional white space per base64 character makes it cost ~45 µs a
# signature (the largest single cost of a verification after the header hashing).
# FWS there matches any run of white space, so "(FWS b64char)*" is "the longest
# run of white space and base64 characters that ends in a base64 character":
# the same matches (a property test compares the two), ~10x faster.
DKIMPY_RE_BTAG = dkim.RE_BTAG
RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")
dkim.RE_BTAG = RE_BTAG  # looked up in dkimpy's module at call time, by DKIM and ARC alike

_LIB_LOG = logging.getLogger("mailwarden.checks.dkim.dkimpy")
_LIB_LOG.setLevel(logging.CRITICAL)
_LIB_LOG.propagate = False

MIN_RSA_BITS = 1024  # RFC 8301 §3.2
MAX_SIGNATURES = 10  # RFC 6376 §6.1: a verifier may limit how many signatures it checks
MAX_SIGNATURE_BYTES = 8192  # a real DKIM-Signature is well under 2 KB

# When no signature passes, the overall result is the most useful of the
# others: a temperror may pass on retry, a fail is evidence of change, policy
# and neutral say the signature was sound but not enough, permerror says it
# was never usable.
_PRECEDENCE = ("pass", "temperror", "fail", "policy", "neutral", "permerror")

# RFC 6376 §3.5: d= is a domain name, s= one or more labels (A-labels for IDNs).
DOMAIN_TAG = re.compile(rb"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")

_KEY_TYPE = {b"rsa-sha256": b"rsa", b"rsa-sha1": b"rsa", b"ed25519-sha256": b"ed25519"}


@dataclass(frozen=True)
class DkimSignature:
    """The verdict on one DKIM-Signature header field."""

    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=
    result: str  # pass, fail, neutral, policy, temperror, permerror (RFC 8601 §2.7.1)
    reason: str
    header_b: str = ""  # the first 8 characters of b=, for header.b (RFC 6008)
    identity: str = ""  # i=
    key_bits: int | None = None
    body_length: int | None = None  # l=, when present

    def auth_result(self) -> str:
        entry = f"dkim={self.result}"
        if self.domain:
            entry += f" header.d={ar_value(self.domain)}"
        if self.selector:
            entry += f" header.s={ar_value(self.selector)}"
        if self.header_b:
            entry += f" header.b={ar_value(self.header_b)}"
        return entry


async def evaluate_dkim(message: bytes, resolver: Resolver) -> CheckResult:
    """Verify every DKIM-Signature; pass when at least one fully passes."""
    started = time.monotonic()
    counter = QueryCounter()
    try:
        signatures = await _evaluate(message, resolver, counter)
    except Exception as exc:  # hostile input must never take the pipeline down
        log.warning("event=dkim_internal_error error=%s", type(exc).__name__, exc_info=True)
        signatures = [DkimSignature("", "", "", "permerror", f"could not evaluate ({type(exc).__name__})")]
    return _summarize(signatures, time.monotonic() - started, counter.lookups)


def _summarize(signatures: list[DkimSignature], elapsed: float, lookups: int) -> CheckResult:
    passing = [s.domain for s in signatures if s.result == "pass"]
    if not signatures:
        result, reason = "none", "the message is not DKIM-signed"
    else:
        best = min(signatures, key=lambda s: _PRECEDENCE.index(s.result))
        result = best.result
        if result == "pass":
            reason = "valid signature from " + ", ".join(dict.fromkeys(passing))
        else:
            reason = f"no valid signature; d={best.domain or '?'} s={best.selector or '?'}: {best.reason}"
        if len(signatures) > 1:
            reason += f" ({len(signatures)} signatures)"
    return CheckResult(
        check="dkim",
        result=result,
        reason=reason,
        auth_results=tuple(s.auth_result() for s in signatures) or ("dkim=none",),
        details={
            "signatures": signatures,
            "passing_domains": list(dict.fromkeys(passing)),
            "results": [(s.result, s.domain) for s in signatures],  # what DMARC needs (RFC 7489 §4.3)
        },
        elapsed=elapsed,
        dns_lookups=lookups,
    )


@dataclass
class _Pending:
    """A signature that parsed and awaits its key."""

    index: int
    header: tuple[bytes, bytes]
    tags: dict[bytes, bytes]
    include_headers: list[bytes]
    summary: DkimSignature  # domain, selector, … with a placeholder result
    key_name: str


_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_WSP = re.compile(rb"\s+")
_DIGITS = re.compile(rb"\d{1,18}")
_COLON_LIST = re.compile(rb"\s*:\s*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def split_message(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's `rfc822_parse`, in linear time: ([name, value], …) and the CRLF body.

    dkimpy appends each continuation line to a bytes object, which is
    quadratic: 400 KB of folded header took seconds. Same rules otherwise,
    including a leading "From " line being skipped; raises
    `dkim.MessageFormatError` where dkimpy would (and for a header section
    that starts with a continuation line, where dkimpy raises IndexError).
    """
    end = message.find(b"\r\n\r\n")
    tail: bytes | None = None
    if end > 0 and not message.startswith(b"\r\n") and message.count(b"\n") == message.count(b"\r\n"):
        # Plain CRLF mail (all that SMTP lets through): split only the header
        # section; the body is already what dkimpy's re-joined lines would be.
        lines = message[: end + 2].split(b"\r\n")
        tail = message[end + 4 :]
    else:
        lines = re.split(rb"\r?\n", message)
    headers: list[list[bytes]] = []
    parts: list[list[bytes]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            break
        if line[0] in (0x09, 0x20):
            if not parts:
                raise dkim.MessageFormatError("the header section starts with a continuation line")
            parts[-1].append(line + b"\r\n")
            continue
        m = _FIELD_NAME.match(line)
        if m is not None:
            parts.append([line[m.end(0) :] + b"\r\n"])
            headers.append([m.group(1), b""])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"not a header field: {line[:60]!r}")
    for header, value in zip(headers, parts, strict=True):
        header[1] = b"".join(value)
    return headers, tail if tail is not None else b"\r\n".join(lines[i:])


def load(signer: dkim.DomainSigner, message: bytes) -> None:
    """Give a dkimpy DKIM/ARC object `message` (see `split_message`)."""
    signer.set_message(None)
    signer.headers, signer.body = split_message(message)


async def _evaluate(message: bytes, resolver: Resolver, counter: QueryCounter) -> list[DkimSignature]:
    verifier = dkim.DKIM(None, logger=_LIB_LOG, minkey=0)
    try:
        load(verifier, message)
    except Exception as exc:
        count = len(re.findall(rb"(?im)^dkim-signature[ \t]*:", message.split(b"\n\n", 1)[0]))
        reason = f"the header section cannot be parsed: {_short(exc)}"
        return [DkimSignature("", "", "", "permerror", reason) for _ in range(min(count, MAX_SIGNATURES))]

    headers = [(name, value) for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    results: dict[int, DkimSignature] = {}
    pending: list[_Pending] = []
    for index, header in enumerate(headers):
        if index >= MAX_SIGNATURES:
            results[index] = DkimSignature(
                "", "", "", "neutral", f"not evaluated: only the first {MAX_SIGNATURES} signatures are checked"
            )
            continue
        parsed = _parse(index, header)
        if isinstance(parsed, DkimSignature):
            results[index] = parsed
        else:
            pending.append(parsed)

    names = list(dict.fromkeys(p.key_name for p in pending))
    answers = await eager.gather(*(_fetch_key(name, resolver, counter) for name in names))
    keys = dict(zip(names, answers, strict=True))
    checked = await run_cpu_bound(len(message), lambda: [_verify(verifier, p, keys[p.key_name]) for p in pending])
    for p, verdict in zip(pending, checked, strict=True):
        results[p.index] = verdict
    return [results[i] for i in sorted(results)]


def _parse(index: int, header: tuple[bytes, bytes]) -> _Pending | DkimSignature:
    value = header[1]
    if len(value) > MAX_SIGNATURE_BYTES:
        return DkimSignature("", "", "", "permerror", f"DKIM-Signature of {len(value)} bytes is too large")
    try:
        tags = parse_tag_value(value)
    except Exception as exc:
        return DkimSignature("", "", "", "permerror", f"malformed tag list: {_short(exc)}")
    summary = DkimSignature(
        domain=_text(tags.get(b"d", b"")).lower().rstrip("."),
        selector=_text(tags.get(b"s", b"")).lower(),
        algorithm=_text(tags.get(b"a", b"")).lower(),
        result="permerror",
        reason="",
        header_b=_text(_WSP.sub(b"", tags.get(b"b", b""))[:8]),
        identity=_text(tags.get(b"i", b"")),
        body_length=int(tags[b"l"]) if _DIGITS.fullmatch(tags.get(b"l", b"x")) else None,
    )

    def error(reason: str) -> DkimSignature:
        return _with(summary, "permerror", reason)

    try:
        dkim.validate_signature_fields(tags)  # RFC 6376 §6.1.1
    except dkim.DKIMException as exc:
        return error(_short(exc))
    except Exception as exc:  # e.g. an i= shorter than d= makes dkimpy index out of range
        return error(f"invalid signature fields ({type(exc).__name__})")
    include_headers = [h.lower() for h in _COLON_LIST.split(tags[b"h"].strip())]
    if b"from" not in include_headers:
        return error("h= does not include From (RFC 6376 §5.4)")
    try:
        CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except Exception:
        return error(f"unknown canonicalization c={_text(tags.get(b'c', b''))}")
    if not (DOMAIN_TAG.fullmatch(tags[b"s"]) and DOMAIN_TAG.fullmatch(tags[b"d"])):
        return error("s= or d= is not a domain name")
    selector, domain = tags[b"s"].decode("ascii"), tags[b"d"].decode("ascii").rstrip(".")
    return _Pending(index, header, tags, include_headers, summary, f"{selector}._domainkey.{domain}")


async def _fetch_key(name: str, resolver: Resolver, counter: QueryCounter) -> list[bytes] | str:
    """The key records at `name`, or the result word and reason when there are none."""
    try:
        texts = await resolver.txt(name, counter)
    except DnsTempError as exc:
        return f"temperror:key lookup failed temporarily ({exc.reason})"
    except ValueError:
        return f"permerror:{name!r} is not a DNS name"
    if not texts:
        return f"permerror:no key published at {name}"  # RFC 6376 §6.1.2
    return [t.encode("utf-8") for t in texts]


def _verify(verifier: dkim.DKIM, p: _Pending, key: list[bytes] | str) -> DkimSignature:
    if isinstance(key, str):
        result, _, reason = key.partition(":")
        return _with(p.summary, result, reason)
    # RFC 6376 §6.1.2: with several key records the verifier may try each; the best outcome counts.
    verdicts = [_verify_with_key(verifier, p, record) for record in key[:4]]
    return min(verdicts, key=lambda v: _PRECEDENCE.index(v.result))


@functools.lru_cache(maxsize=1024)
def _key_record(name: bytes, record: bytes, algorithm: bytes) -> tuple[Any, int, bytes, bool] | str:
    """The usable key in `record` for a signature with a=`algorithm`, or why there is none.

    Keys repeat across messages, and parsing one (tag list, then ASN.1 in pure
    Python) cost more than the RSA verification itself, so each distinct
    (record, a=) is judged once; the parsed key is only ever read.
    """
    try:
        key_tags = parse_tag_value(record)
    except Exception:
        return "the key record is not a tag list"
    if key_tags.get(b"p", None) == b"":
        return "the key has been revoked (empty p=)"  # RFC 6376 §3.6.1
    if key_tags.get(b"k", b"rsa") != _KEY_TYPE.get(algorithm):
        return f"a={_text(algorithm)} does not match the key type"
    hashes = key_tags.get(b"h")
    if hashes is not None and algorithm.split(b"-")[-1] not in _COLON_LIST.split(hashes.strip()):
        return f"the key's h= does not allow a={_text(algorithm)}"
    try:
        pk, bits, ktag, tlsrpt = dkim.evaluate_pk(name, record)
    except Exception as exc:
        return f"unusable key: {_short(exc)}"
    if pk is None:
        return "the key is not for email"
    return pk, bits, ktag, tlsrpt


def _verify_with_key(verifier: dkim.DKIM, p: _Pending, record: bytes) -> DkimSignature:
    summary, tags = p.summary, p.tags
    algorithm = tags[b"a"]
    key = _key_record(p.key_name.encode("ascii"), record, algorithm)
    if isinstance(key, str):
        return _with(summary, "permerror", key)
    pk, bits, ktag, tlsrpt = key
    summary = _with(summary, summary.result, summary.reason, key_bits=bits)

    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = pk, bits, ktag, tlsrpt
    # dkimpy canonicalizes every header field and then picks those named in h=;
    # picking by name first gives it the same fields (`select_headers` looks only
    # at names in h=) and saves canonicalizing the rest.
    everything = verifier.headers
    named = set(p.include_headers)
    verifier.headers = [field for field in everything if field[0].lower() in named]
    try:
        good = verifier.verify_sig_process(dict(tags), list(p.include_headers), p.header, None)
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return _with(summary, "fail", "body hash mismatch: the body changed after signing")
        return _with(summary, "permerror", _short(exc))
    except (dkim.DKIMException, binascii.Error) as exc:
        return _with(summary, "permerror", _short(exc))
    except Exception as exc:  # e.g. pynacl's ValueError for a b= of the wrong length
        return _with(summary, "fail", f"the signature cannot be checked ({type(exc).__name__})")
    finally:
        verifier.headers = everything
    if not good:
        return _with(summary, "fail", "signature does not verify: signed header fields changed, or another key")

    if ktag == b"rsa" and bits < MIN_RSA_BITS:
        return _with(summary, "policy", f"RSA key of {bits} bits; at least {MIN_RSA_BITS} required (RFC 8301 §3.2)")
    if algorithm == b"rsa-sha1":
        return _with(summary, "policy", "rsa-sha1 is not accepted (RFC 8301 §3.1)")
    if summary.body_length is not None:
        canon = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        body = len(canon.canonicalize_body(verifier.body))
        if summary.body_length < body:
            # RFC 6376 §8.2: what follows l= is unsigned; anyone could have added it.
            return _with(
                summary,
                "policy",
                f"l={summary.body_length} signs only {summary.body_length} of {body} body bytes",
            )
        if summary.body_length > body:
            return _with(summary, "fail", f"l={summary.body_length} is longer than the {body}-byte body")
    return _with(summary, "pass", f"{_text(algorithm)} signature verified ({bits}-bit key)")


def _with(summary: DkimSignature, result: str, reason: str, **changes: Any) -> DkimSignature:
    fields = {**summary.__dict__, "result": result, "reason": reason, **changes}
    return DkimSignature(**fields)


def _text(value: bytes) -> str:
    """Tag text for reports and logs: no control characters (no log or header injection), bounded."""
    return _CONTROL.sub("", value.decode("utf-8", "replace"))[:255]


def ar_value(value: str) -> str:
    """A safe RFC 8601 value: a token as is, anything else as a quoted-string without CR/LF."""
    if re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+", value):
        return value
    cleaned = re.sub(r"[\x00-\x1f\x7f]", "", value)[:255]
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _short(exc: BaseException) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(exc)) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"
