"""Outbound DKIM signing: what users and trusted networks send leaves signed with Ed25519 and RSA-2048.

Signatures are checked by our verifier (checks/dkim.py, dkimpy underneath)
and by OpenDKIM, against the records `mailwarden dkim show` tells the
administrator to publish, served by the dnslib fixture.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import shutil
import smtplib
import sqlite3
import subprocess
import time
from pathlib import Path

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden.checks.dkim import evaluate_dkim
from mailwarden.dns.resolver import Resolver
from mailwarden.outbound import signing
from mailwarden.outbound.dkim_keys import new_key_set, retire_due, rotate
from mailwarden.outbound.signing import (
    SigningError,
    body_digest,
    relaxed_body,
    sign,
    signed_headers,
    split_message,
)
from mailwarden.storage.schema import SCHEMA_VERSION
from mailwarden.storage.sql import SqlStore
from tests.conftest import ALICE, ALICE_PW, BOB, DnsServer, RunningServer
from tests.test_arc_seal import published
from tests.test_dkim import publish

OPENDKIM = shutil.which("opendkim") or "opendkim"  # Debian opendkim; a missing one fails loudly
DAY = 86400.0


def letter(from_header: str = ALICE, extra: str = "", subject: str = "quarterly  numbers") -> bytes:
    return (
        f"From: Alice <{from_header}>\r\nTo: Bob <{BOB}>\r\nSubject: {subject}\r\n"
        "Date: Tue, 3 Jun 2025 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n{extra}\r\n"
        "Hello Bob,\r\n\tthe numbers  are attached. \r\n\r\n"
    ).encode()


def submit(server: RunningServer, data: bytes, sender: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.ehlo("laptop")
        c.starttls(context=server.tls.client_context())
        c.ehlo("laptop")
        c.login(ALICE, ALICE_PW)
        assert c.sendmail(sender, [BOB], data) == {}


def send_mx(server: RunningServer, data: bytes, sender: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("relay.example.test")
        c.starttls(context=server.tls.client_context())
        c.ehlo("relay.example.test")
        assert c.sendmail(sender, [BOB], data) == {}


def publish_shown(server: RunningServer, dns_server: DnsServer, domain: str = "example.test") -> str:
    """Make DNS hold exactly what `dkim show` says to publish; returns its output."""
    code, out, err = server.cli("dkim", "show", domain)
    assert code == 0, err
    dns_server.records.clear()
    for name, value in published(out):
        publish(dns_server, name, value)
    return out


def verify(dns_server: DnsServer, message: bytes) -> list[tuple[str, str, str]]:
    """(algorithm, selector, result) of each signature, by our verifier."""
    result = asyncio.run(evaluate_dkim(message, Resolver([dns_server.address], timeout=2)))
    return sorted((s.algorithm, s.selector, s.result) for s in result.details["signatures"])


def signature_tags(message: bytes) -> list[dict[str, str]]:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.findall(r"^DKIM-Signature:(.*?)(?=\r\n\S)", head, re.M | re.S)
    return [
        {k.strip(): re.sub(r"\s+", "", v) for k, v in (p.split("=", 1) for p in f.split(";") if "=" in p)}
        for f in fields
    ]


# ---- end to end -----------------------------------------------------------------


def test_submitted_mail_carries_two_signatures_that_verify(server: RunningServer, dns_server: DnsServer) -> None:
    publish_shown(server, dns_server)
    submit(server, letter())
    stored = server.message(BOB, 1)
    tags = signature_tags(stored)
    assert sorted(t["a"] for t in tags) == ["ed25519-sha256", "rsa-sha256"]
    for t in tags:
        assert (t["c"], t["d"]) == ("relaxed/relaxed", "example.test")
        assert "l" not in t
        names = t["h"].split(":")
        for once_more in ("from", "to", "subject", "date", "reply-to"):
            # listed once more than the message has it (Reply-To: none, so once)
            assert names.count(once_more) == stored.lower().count(f"\r\n{once_more}:".encode()) + 1, once_more
        assert {"message-id", "mime-version", "content-type"} <= set(names)
    results = verify(dns_server, stored)
    assert [(a, r) for a, _, r in results] == [("ed25519-sha256", "pass"), ("rsa-sha256", "pass")]


def test_a_header_added_later_breaks_the_signatures(server: RunningServer, dns_server: DnsServer) -> None:
    publish_shown(server, dns_server)
    submit(server, letter())
    stored = server.message(BOB, 1)
    second_subject = stored.replace(b"\r\nSubject:", b"\r\nSubject: you won a prize\r\nSubject:", 1)
    added_reply_to = stored.replace(b"\r\nFrom:", b"\r\nReply-To: thief@evil.test\r\nFrom:", 1)
    appended_body = stored + b"P.S. click here\r\n"
    for tampered in (second_subject, added_reply_to, appended_body):
        assert [r for _, _, r in verify(dns_server, tampered)] == ["fail", "fail"]


def test_trusted_network_mail_on_the_mx_is_signed(
    server: RunningServer, dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    publish_shown(server, dns_server)
    # From one of our domains; then a foreign From with our envelope sender (signed as the sender's domain);
    # then nothing of ours at all (not signed, and the log says why).
    send_mx(server, letter(), ALICE)
    send_mx(server, letter(from_header="news@elsewhere.test"), ALICE)
    send_mx(server, letter(from_header="news@elsewhere.test"), "bounces@elsewhere.test")
    first, second, third = (server.message(BOB, uid) for uid in (1, 2, 3))
    assert [r for _, _, r in verify(dns_server, first)] == ["pass", "pass"]
    assert [t["d"] for t in signature_tags(second)] == ["example.test", "example.test"]
    assert [r for _, _, r in verify(dns_server, second)] == ["pass", "pass"]
    assert b"DKIM-Signature" not in third
    lines = [r.getMessage() for r in caplog.records]
    assert sum("event=dkim_signed " in line and "domain=example.test" in line for line in lines) == 2
    assert any("event=dkim_not_signed" in line and "no active key for elsewhere.test" in line for line in lines), lines


def test_untrusted_mx_mail_is_not_signed(server_factory, dns_server: DnsServer) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"inbound.trusted_networks": [], "inbound.checks": False})
    send_mx(server, letter(), ALICE)
    assert b"DKIM-Signature" not in server.message(BOB, 1)


# ---- rotation -------------------------------------------------------------------


def test_rotation_keeps_old_mail_verifiable_until_the_overlap_ends(
    server: RunningServer, dns_server: DnsServer
) -> None:
    store = server.server.store
    publish_shown(server, dns_server)
    submit(server, letter(subject="before"))
    old_mail = server.message(BOB, 1)
    old_selectors = sorted(t["s"] for t in signature_tags(old_mail))

    start = time.time()
    done = server.call(rotate(store, "example.test", 7, now=start))
    assert sorted(k.selector for k in done.retiring) == old_selectors
    assert done.retire_at == start + 7 * DAY
    shown = publish_shown(server, dns_server)
    assert "retiring until" in shown and len(published(shown)) == 4  # two new, two retiring: all published

    submit(server, letter(subject="after"))
    new_mail = server.message(BOB, 2)
    new_selectors = sorted(t["s"] for t in signature_tags(new_mail))
    assert new_selectors == sorted(k.selector for k in done.new) and not set(new_selectors) & set(old_selectors)
    assert [r for _, _, r in verify(dns_server, old_mail)] == ["pass", "pass"]  # the overlap
    assert [r for _, _, r in verify(dns_server, new_mail)] == ["pass", "pass"]

    assert server.call(retire_due(store, now=start + 7 * DAY - 60)) == []  # not yet
    retired = server.call(retire_due(store, now=start + 7 * DAY + 1))
    assert sorted(k.selector for k in retired) == old_selectors
    shown = publish_shown(server, dns_server)
    assert sorted(name.split(".")[0] for name, _ in published(shown)) == new_selectors
    for selector in old_selectors:
        assert f"; retired: remove {selector}._domainkey.example.test. IN TXT" in shown
    assert [r for _, _, r in verify(dns_server, new_mail)] == ["pass", "pass"]
    assert [r for _, _, r in verify(dns_server, old_mail)] == ["permerror", "permerror"]  # its keys are gone


def test_dkim_rotate_prints_what_to_publish_and_what_to_remove(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"dkim.rotation_overlap_days": 3})
    _, before, _ = server.cli("dkim", "show", "example.test")
    old = [name for name, _ in published(before)]
    earliest = time.time()
    code, out, err = server.cli("dkim", "rotate", "example.test")
    latest = time.time()
    assert code == 0, err
    new = [name for name, _ in published(out)]
    assert len(new) == 2 and not set(new) & set(old)
    when = {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t + 3 * DAY)) for t in (earliest, latest)}
    removals = re.findall(r"^; remove after (.+ UTC): (\S+)\. IN TXT$", out, re.M)
    assert sorted(name for _, name in removals) == sorted(old)
    assert all(date in when for date, _ in removals)
    code, out, err = server.cli("dkim", "rotate", "unknown.test")
    assert code != 0 and "not a hosted domain" in err


def test_schema_3_database_gains_retire_at_in_place(tmp_path: Path) -> None:

    async def make() -> None:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        await store.add_domain("example.test")
        await store.add_signing_keys(new_key_set("example.test"))
        await store.close()

    asyncio.run(make())
    with sqlite3.connect(tmp_path / "db.sqlite") as db:  # back to what schema 3 had
        db.execute("ALTER TABLE dkim_keys DROP COLUMN retire_at")
        db.execute("UPDATE schema_version SET version = 3")

    async def reopen() -> list[str]:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        try:
            done = await rotate(store, "example.test", 7, now=1000.0)
            assert [k.retire_at for k in done.retiring] == [1000.0 + 7 * DAY] * 2
            return sorted(k.state for k in await store.signing_keys("example.test"))
        finally:
            await store.close()

    assert asyncio.run(reopen()) == ["active", "active", "retiring", "retiring"]
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)


# ---- OpenDKIM ---------------------------------------------------------------------


def opendkim_verdicts(tmp_path: Path, dns_server: DnsServer, message: bytes) -> list[str]:
    """OpenDKIM's dkim= results for `message`, in its test mode (-t), asking the dnslib server."""
    # OpenDKIM resolves through libunbound: forward everything to the fixture, which listens on
    # loopback (unbound refuses that by default) and serves .test (a default local zone in unbound).
    (tmp_path / "unbound.conf").write_text(
        'server:\n  do-not-query-localhost: no\n  local-zone: "test." nodefault\n  module-config: "iterator"\n'
        f'forward-zone:\n  name: "."\n  forward-addr: {dns_server.host}@{dns_server.port}\n'
    )
    (tmp_path / "opendkim.conf").write_text(
        f"Mode v\nSyslog no\nAuthservID verifier.test\nResolverConfiguration {tmp_path / 'unbound.conf'}\n"
    )
    (tmp_path / "message.eml").write_bytes(message)
    run = subprocess.run(
        [OPENDKIM, "-x", str(tmp_path / "opendkim.conf"), "-t", str(tmp_path / "message.eml"), "-vv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    ar = re.search(r"hname='Authentication-Results' hvalue='([^']*)'", run.stdout)
    assert ar, run.stdout + run.stderr
    # e.g. "dkim=pass (2048-bit key; unprotected) header.d=example.test ... header.a=rsa-sha256 ...;"
    entries = [e for e in re.split(r"(?=\bdkim=)", ar.group(1)) if e.startswith("dkim=")]
    return sorted((e.split()[0][5:].rstrip(";"), re.search(r"header\.a=([\w-]+)", e).group(1)) for e in entries)  # type: ignore[union-attr]


def test_opendkim_verifies_what_we_sign(server: RunningServer, dns_server: DnsServer, tmp_path: Path) -> None:
    publish_shown(server, dns_server)
    folded = "References: <a@example.test>\r\n\t<b@example.test>\r\nCc:   Carol  <carol@example.test>   \r\n"
    submit(server, letter(extra=folded))
    stored = server.message(BOB, 1)
    assert opendkim_verdicts(tmp_path, dns_server, stored) == [("pass", "ed25519-sha256"), ("pass", "rsa-sha256")]
    tampered = stored.replace(b"\r\nSubject:", b"\r\nSubject: changed\r\nSubject:", 1)
    assert opendkim_verdicts(tmp_path, dns_server, tampered) == [("fail", "ed25519-sha256"), ("fail", "rsa-sha256")]


# ---- the signer against dkimpy ------------------------------------------------------

KEYS = new_key_set("example.test", now=1_700_000_000)
RECORDS = {f"{k.selector}._domainkey.example.test.".encode(): k.public_txt.encode() for k in KEYS}

# RFC 5322 field bodies: printable ASCII, SP, HTAB, and UTF-8 (RFC 6532).
_TEXT = st.lists(
    st.sampled_from([b"a", b"Z", b"0", b" ", b"  ", b"\t", b":", b";", b"=", b"<x@y>", b"\xc3\xa9", b"."]),
    max_size=12,
).map(b"".join)
_NAMES = st.sampled_from(
    [b"From", b"from", b"TO", b"To", b"Subject", b"Date", b"Reply-To", b"Cc", b"Message-ID", b"X-Mailer",
     b"Received", b"Content-Type", b"List-Id", b"References", b"X-Spam"]
)  # fmt: skip
_FIELD = st.tuples(_NAMES, _TEXT, st.lists(st.tuples(st.sampled_from([b" ", b"\t"]), _TEXT), max_size=2)).map(
    lambda f: f[0] + b":" + f[1] + b"".join(b"\r\n" + ws + text for ws, text in f[2]) + b"\r\n"
)
_BODY = st.lists(st.tuples(_TEXT, st.sampled_from([b"\r\n"])).map(b"".join), max_size=8).map(b"".join)
_TAIL = st.sampled_from([b"", b"x", b" ", b"\t \r\n", b"\r\n\r\n", b"last line  "])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(_FIELD, max_size=10))
    fields.insert(draw(st.integers(0, len(fields))), b"From: <a@example.test>\r\n")
    return b"".join(fields) + b"\r\n" + draw(_BODY) + draw(_TAIL)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_our_canonicalization_equals_dkimpys(message: bytes) -> None:
    head, body = split_message(message)
    names, data = signed_headers(head)
    theirs_headers, theirs_body = dkim.rfc822_parse(message)
    selected = dkim.select_headers(Relaxed.canonicalize_headers(theirs_headers), list(names))
    assert data == b"".join(name + b":" + value for name, value in selected)
    assert relaxed_body(body) == Relaxed.canonicalize_body(theirs_body)
    assert body_digest(message, len(message) - len(body)) == hashlib.sha256(relaxed_body(body)).digest()


# Bodies as mail clients write them (words, single spaces: the fast path), and with what relaxed
# canonicalization changes: tabs, runs of spaces, spaces at line ends, bare CRs, empty lines at the end.
_WORDS = st.lists(st.sampled_from([b"a", b"Zz", b"0.", b"\xc3\xa9", b"<x@y>"]), min_size=1, max_size=4).map(b" ".join)
_ODD = st.sampled_from([b"\t", b"  ", b" ", b"\r", b" \r", b"\r ", b"\t \t"])
_LINE = st.one_of(
    _WORDS,
    st.just(b""),
    st.tuples(st.sampled_from([b"", b" "]), _WORDS, _ODD, st.sampled_from([b"", b"x"])).map(b"".join),
)
_CLEAN_OR_NOT_BODY = st.tuples(
    st.lists(_LINE, max_size=6).map(lambda lines: b"".join(line + b"\r\n" for line in lines)),
    st.sampled_from([b"", b"\r\n", b"\r\n\r\n", b"\r\n\r\n\r\n", b"x", b"last ", b"\t", b" \r\n\r\n"]),
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"", b"From: a@example.test\r\n\r\n", b"Subject:  two\tspaces \r\n\r\n"]),
    _CLEAN_OR_NOT_BODY,
)
def test_fast_body_path_equals_the_general_one(prefix: bytes, body: bytes) -> None:
    """body_digest's shortcut (hash in place, skip the regular expressions) changes nothing."""
    message = prefix + body
    # The shortcut is taken exactly when the body has no tab, no two spaces, no space before a CR,
    # whatever the header holds.
    clean = not (b"\t" in body or b"  " in body or b" \r" in body or b"\r " in body or b"\r\r" in body)
    assert signing._clean(message, len(prefix)) == clean
    assert body_digest(message, len(prefix)) == hashlib.sha256(relaxed_body(body)).digest()
    assert body_digest(body) == hashlib.sha256(Relaxed.canonicalize_body(body)).digest()


@settings(max_examples=100, deadline=None)
@given(messages())
def test_dkimpy_verifies_what_we_sign(message: bytes) -> None:
    signed = sign(message, KEYS, now=1_700_000_000) + message
    for index in range(2):
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=lambda name, timeout=5: RECORDS.get(name))


def test_what_verifiers_would_read_differently_is_not_signed() -> None:
    ok = b"From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n"
    assert sign(ok, KEYS).count(b"DKIM-Signature:") == 2
    for bad, reason in (
        (b"From: a@example.test\nSubject: x\r\n\r\nbody\r\n", "bare CR or LF"),
        (b"From: a@example.test\r\nno colon here\r\n\r\nbody\r\n", "malformed header line"),
        (b"From: a@example.test\r\nSubject\r\n\r\nbody\r\n", "malformed header line"),
        (b" folded: first\r\nFrom: a@example.test\r\n\r\nbody\r\n", "continuation line"),
        (b"Subject: no author\r\n\r\nbody\r\n", "no From header"),
        (b"From: a@example.test\r\n" + b"X: y\r\n" * 1001 + b"\r\nbody\r\n", "more than 1000 header fields"),
    ):
        with pytest.raises(SigningError, match=reason):
            sign(bad, KEYS)


def test_ed25519_signatures_are_the_same_as_openssls() -> None:
    """We sign Ed25519 with libsodium for speed; Ed25519 is deterministic, so OpenSSL must give the same bytes."""
    from cryptography.hazmat.primitives.asymmetric import ed25519 as openssl_ed25519

    from mailwarden.outbound import signing

    key = next(k for k in new_key_set("example.test") if k.algorithm == "ed25519-sha256")
    loaded = signing._load(key)
    reference = openssl_ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.private_pem))
    for digest in (b"\x00" * 32, hashlib.sha256(b"a message").digest(), bytes(range(32))):
        assert loaded.sign(digest) == reference.sign(digest)
