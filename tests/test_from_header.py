"""The DMARC author domain: one From, one address, no ambiguity ("Composition Kills", USENIX 2020).

Every spoofing shape ends either in FromHeaderError (the pipeline's 550 5.7.1)
or in a DMARC verdict about the domain the reader sees, never in a pass for a
domain the attacker does not own.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwarden.checks.dmarc import DkimIdentity, SpfIdentity, evaluate_dmarc
from mailwarden.checks.from_header import AuthorDomain, FromHeaderError, parse_author
from mailwarden.checks.result import Action, CheckResult
from mailwarden.dns.resolver import Resolver
from mailwarden.pipeline.submission import split_header_block
from tests.conftest import DnsServer

ZONE = """
ourdomain.test. 300 IN SOA ns.ourdomain.test. admin.ourdomain.test. 1 3600 600 86400 60
_dmarc.ourdomain.test. 300 IN TXT "v=DMARC1; p=reject"
_dmarc.attacker.test. 300 IN TXT "v=DMARC1; p=none"
"""

# The attacker authenticates everything they can: their own SPF and DKIM.
ATTACKER_SPF = SpfIdentity("pass", "attacker.test")
ATTACKER_DKIM = [DkimIdentity("pass", "attacker.test", "s1")]


def headers(*lines: str) -> bytes:
    return ("\r\n".join([*lines, "To: victim@example.test", "Subject: hi"]) + "\r\n\r\n").encode()


def author(*lines: str) -> AuthorDomain:
    return parse_author(headers(*lines))


def refused(*lines: str) -> str:
    with pytest.raises(FromHeaderError) as info:
        author(*lines)
    return info.value.reason


async def verdict(dns_server: DnsServer, message: bytes) -> FromHeaderError | CheckResult:
    """What the pipeline does with an attacker-authenticated message: refuse it, or evaluate DMARC."""
    dns_server.add(ZONE)
    header_block, _body = split_header_block(message)
    try:
        domain = parse_author(header_block).domain
    except FromHeaderError as exc:
        return exc
    return await evaluate_dmarc(domain, ATTACKER_SPF, ATTACKER_DKIM, Resolver([dns_server.address], timeout=2.0))


# ---- what is accepted -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "domain", "address"),
    [
        ("From: alice@example.test", "example.test", "alice@example.test"),
        ("From: Alice <alice@Example.TEST>", "example.test", "alice@example.test"),
        ('From: "Alice, Sales" <alice@example.test>', "example.test", "alice@example.test"),
        ("From: alice@example.test (Alice)", "example.test", "alice@example.test"),
        ("From: Alice (work) <alice@mail.example.test>", "mail.example.test", "alice@mail.example.test"),
        ("From: =?utf-8?q?Al=C3=AFce?= <alice@example.test>", "example.test", "alice@example.test"),
        ("FROM: alice@example.test", "example.test", "alice@example.test"),
        ("From: alice@example.test,", "example.test", "alice@example.test"),  # RFC 5322 §4.4 empty element
        ("From: Jörg <jörg@bücher.test>", "xn--bcher-kva.test", "jörg@xn--bcher-kva.test"),
        ("From: a@XN--BCHER-KVA.test", "xn--bcher-kva.test", "a@xn--bcher-kva.test"),
    ],
)
def test_single_mailbox_gives_the_lower_case_a_label_domain(line: str, domain: str, address: str) -> None:
    got = author(line)
    assert (got.domain, got.address) == (domain, address)


def test_folded_from_is_unfolded_and_parsed() -> None:
    got = author("From: Alice\r\n  Example\r\n\t<alice@\r\n example.test>")
    assert (got.domain, got.display_name) == ("example.test", "Alice Example")


def test_display_name_that_looks_like_an_address_is_only_a_name() -> None:
    got = author('From: "ceo@ourdomain.test" <evil@attacker.test>')
    assert (got.domain, got.display_name) == ("attacker.test", "ceo@ourdomain.test")


def test_a_whole_message_and_bare_lf_line_ends_work() -> None:
    message = b"Received: x\nFrom: Bob <bob@example.test>\nSubject: s\n\nFrom: body@attacker.test\n"
    assert parse_author(message).domain == "example.test"


# ---- what is refused ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (("Sender: a@example.test",), "no From header"),
        (("From: a@example.test", "From: b@example.test"), "2 From headers"),
        (("From: a@example.test", "from: a@example.test"), "2 From headers"),
        (("From : a@example.test", "From: b@example.test"), "2 From headers"),
        (("From\t: a@example.test", "FROM: b@example.test"), "2 From headers"),
        ((" From: ceo@ourdomain.test", "From: evil@attacker.test"), "2 From headers"),  # leading fold
        (("Subject: x\rFrom: ceo@ourdomain.test", "From: evil@attacker.test"), "2 From headers"),  # bare CR
        (("From: a@x.test, b@y.test",), "2 addresses"),
        (("From: <a@x.test>, Bob <b@y.test>",), "2 addresses"),
        (("From: ceo@ourdomain.test,\r\n evil@attacker.test",), "2 addresses"),  # folded second address
        (("From: Team: a@x.test, b@y.test;",), "group syntax"),
        (("From: =?utf-8?b?Y2VvQG91cmRvbWFpbi50ZXN0?=",), "encoded-word"),
        (("From: <=?utf-8?q?ceo?=@ourdomain.test>",), "encoded-word"),
        (("From: evil@=?utf-8?q?ourdomain?=.test",), "encoded-word"),
        (("From: <@attacker.test,@relay.test:ceo@ourdomain.test>",), "source route"),
        (("From: <@attacker.test:ceo@ourdomain.test>",), "source route"),
        (("From: ceo@ourdomain.test <evil@attacker.test>",), "display name"),
        (('From: "ceo@ourdomain.test"@attacker.test',), "quoted local part"),
        (("From: evil@attacker.test(@ourdomain.test)",), "comment"),
        (("From: (ceo@ourdomain.test) <evil@attacker.test>",), "comment"),
        (("From: <evil(x)@attacker.test>",), "comment inside"),
        (("From: <evil@attacker.test> ceo@ourdomain.test",), "after the address"),
        (("From: <evil@attacker.test",), "angle brackets"),
        (("From: <a@x.test> <b@y.test>",), "angle brackets"),
        (("From: a@b@ourdomain.test",), "more than one @"),
        (('From: "unterminated <a@x.test>',), "unterminated"),
        (("From: (open <a@x.test>",), "unbalanced"),
        (("From: a@x.test\x00.ourdomain.test",), "control character"),
        (("From: a@[192.0.2.1]",), "domain literal"),
        (("From: a@localhost",), "fully qualified"),
        (("From: a@example.test.",), "ends with a dot"),
        (("From: a@exa_mple.test",), "not a host name"),
        (("From: a@xn--zz.test",), "IDNA"),
        (("From: <>",), "empty address"),
        (("From:",), "no address"),
        (("From: alice",), "no @"),
    ],
)
def test_ambiguous_or_unparseable_from_is_refused(lines: tuple[str, ...], reason: str) -> None:
    assert reason in refused(*lines)


def test_a_from_folded_into_another_field_is_that_fields_text() -> None:
    # RFC 5322 §2.2.3: a line starting with whitespace continues the previous field.
    assert author("X-Note: see\r\n From: ceo@ourdomain.test", "From: evil@attacker.test").domain == "attacker.test"


_PIECES = st.sampled_from(
    ["From", "from", " ", "\t", ":", ",", ";", "<", ">", "@", ".", '"', "(", ")", "\\", "[", "]", "\r\n", "\r", "\n",
     "a", "x.test", "=?utf-8?b?YQ==?=", "é", "\x00", "xn--", "-"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join), st.binary(max_size=40))
def test_any_input_gives_an_author_or_a_from_header_error(text: str, raw: bytes) -> None:
    for block in (("From: " + text).encode(), text.encode(), b"From: " + raw):
        try:
            got = parse_author(block)
        except FromHeaderError:
            continue
        assert got.domain == got.domain.lower() and got.domain.isascii() and "." in got.domain
        assert got.address.endswith("@" + got.domain)


# ---- end to end: never a pass for a domain the attacker does not own ------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        headers("From: ceo@ourdomain.test", "From: evil@attacker.test"),
        headers("From: evil@attacker.test", "From: ceo@ourdomain.test"),
        headers("From: ceo@ourdomain.test, evil@attacker.test"),
        headers("From: evil@attacker.test, ceo@ourdomain.test"),
        headers("From : ceo@ourdomain.test", "From: evil@attacker.test"),
        headers("From: evil@attacker.test", "From : ceo@ourdomain.test"),
        headers("From: ceo@ourdomain.test,\r\n\tevil@attacker.test"),
        headers("From: =?utf-8?b?Y2VvQG91cmRvbWFpbi50ZXN0?= <evil@attacker.test>", "From: ceo@ourdomain.test"),
        headers("From: =?utf-8?b?Y2VvQG91cmRvbWFpbi50ZXN0?="),
        headers("From: <@attacker.test:ceo@ourdomain.test>"),
        headers('From: "ceo@ourdomain.test"@attacker.test'),
        headers("From: ceo@ourdomain.test <evil@attacker.test>"),
    ],
)
async def test_spoofing_shapes_are_refused(dns_server: DnsServer, message: bytes) -> None:
    assert isinstance(await verdict(dns_server, message), FromHeaderError)


async def test_from_with_a_space_alone_is_evaluated_for_the_domain_it_names(dns_server: DnsServer) -> None:
    r = await verdict(dns_server, headers("From : ceo@ourdomain.test"))
    assert isinstance(r, CheckResult)
    assert (r.result, r.action) == ("fail", Action.REJECT)
    assert r.auth_results[0].endswith("header.from=ourdomain.test")


async def test_folded_from_is_evaluated_for_the_domain_it_names(dns_server: DnsServer) -> None:
    r = await verdict(dns_server, headers("From: The CEO\r\n <ceo@\r\n ourdomain.test>"))
    assert isinstance(r, CheckResult)
    assert (r.result, r.action) == ("fail", Action.REJECT)


async def test_display_name_spoof_is_judged_as_the_attackers_own_domain(dns_server: DnsServer) -> None:
    r = await verdict(dns_server, headers('From: "ceo@ourdomain.test" <evil@attacker.test>'))
    assert isinstance(r, CheckResult)
    # A pass, but for attacker.test: what the reader's client must show as the address.
    assert r.auth_results == ("dmarc=pass (p=none dis=none) header.from=attacker.test",)


async def test_dkim_pass_for_another_org_domain_does_not_make_our_from_pass(dns_server: DnsServer) -> None:
    r = await verdict(dns_server, headers("From: CEO <ceo@ourdomain.test>"))
    assert isinstance(r, CheckResult)
    assert (r.result, r.action) == ("fail", Action.REJECT)
    assert r.details["dkim"][0] == {"domain": "attacker.test", "selector": "s1", "result": "pass", "aligned": False}
