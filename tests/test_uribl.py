"""URIBL: the domains a body links to (body_links.extract_domains), looked up against a real DNS server."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailwarden.checks.body_links import extract_domains
from mailwarden.checks.dnsbl import parse_zone
from mailwarden.checks.result import Action
from mailwarden.checks.uribl import check_body
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

DBL = parse_zone({"preset": "spamhaus-dbl", "name": "dbl.bl.test"})
URIBL = parse_zone(
    {
        "name": "multi.uribl.test",
        "kind": "domain",
        "codes": {"127.0.0.2": {"meaning": "black", "score": 3.0, "action": "junk"}},
    }
)
ZEN = parse_zone({"preset": "spamhaus-zen", "name": "zen.bl.test"})

SOA = """
bl.test. 300 IN SOA ns.bl.test. admin.bl.test. 1 3600 600 86400 0
uribl.test. 300 IN SOA ns.uribl.test. admin.uribl.test. 1 3600 600 86400 0
"""

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(dns_server: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver([dns_server.address], timeout=timeout)


def lookups(dns_server: DnsServer, zone: str) -> list[str]:
    """Listing queries to `zone` (not its RFC 5782 sanity probe)."""
    return [n for n, _ in dns_server.queries if n.endswith("." + zone) and not n.startswith("invalid.")]


def multipart(*parts: bytes, boundary: str = "b1") -> bytes:
    head = (
        "From: a@sender.example\r\nTo: b@example.test\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\npreamble\r\n'
    ).encode()
    body = b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts)
    return head + body + f"--{boundary}--\r\n".encode()


def part(ctype: str, body: bytes, cte: str | None = None) -> bytes:
    headers = f"Content-Type: {ctype}\r\n"
    if cte:
        headers += f"Content-Transfer-Encoding: {cte}\r\n"
    return headers.encode() + b"\r\n" + body


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def plain(text: str) -> bytes:
    return b"Subject: t\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode()


HTML = b"""<html><body><p>Your parcel is waiting.</p>
<a href="https://Track.Evil-Parcel.example/p?id=1">track</a>
<img src="//cdn.images.example/pixel.gif"></body></html>"""


# ---- check_body ---------------------------------------------------------------------


async def test_listed_link_in_a_base64_html_part(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "evil-parcel.example.dbl.bl.test. 300 IN A 127.0.1.4\n")
    message = multipart(
        part("text/plain; charset=utf-8", b"Plain version, see https://www.shop.example/."),
        part("text/html; charset=utf-8", b64(HTML), "base64"),
    )
    result = await check_body(message, [DBL, ZEN], make(dns_server))
    assert (result.check, result.result, result.action, result.score) == ("uribl", "listed", Action.REJECT, 8.0)
    assert "evil-parcel.example is listed in dbl.bl.test" in result.reason and "phishing" in result.reason
    assert result.details["domains"] == ["shop.example", "evil-parcel.example", "images.example"]
    assert result.auth_results == ()
    assert sorted(lookups(dns_server, "dbl.bl.test")) == [
        "evil-parcel.example.dbl.bl.test",
        "images.example.dbl.bl.test",
        "shop.example.dbl.bl.test",
    ]
    assert lookups(dns_server, "zen.bl.test") == []  # an IP zone has no business with body links


async def test_quoted_printable_soft_break_inside_a_url(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "phish-login.example.multi.uribl.test. 300 IN A 127.0.0.2\n")
    body = b"Log in at http://secure.phish-lo=\r\ngin.example/acc=\r\nount now=3D\r\n"
    message = multipart(part("text/plain; charset=us-ascii", body, "quoted-printable"))
    assert extract_domains(message, 10) == ["phish-login.example"]
    result = await check_body(message, [URIBL], make(dns_server))
    assert (result.result, result.action, result.score) == ("listed", Action.JUNK, 3.0)
    assert "phish-login.example is listed in multi.uribl.test" in result.reason


async def test_hits_in_two_zones_add_up(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + """
spam.example.multi.uribl.test. 300 IN A 127.0.0.2
spam.example.dbl.bl.test. 300 IN A 127.0.1.2
"""
    )
    result = await check_body(plain("buy at http://spam.example/"), [DBL, URIBL], make(dns_server))
    assert (result.result, result.action, result.score) == ("listed", Action.REJECT, 9.0)
    assert {h["zone"] for h in result.details["hits"]} == {"dbl.bl.test", "multi.uribl.test"}


async def test_lookup_cap_is_respected(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    links = " ".join(f"http://site{n}.example/" for n in range(40))
    result = await check_body(plain(links), [DBL], make(dns_server), max_lookups=7)
    assert result.result == "clean"
    assert lookups(dns_server, "dbl.bl.test") == [f"site{n}.example.dbl.bl.test" for n in range(7)]
    assert result.details["truncated"] is True and len(result.details["domains"]) == 7


async def test_lookup_cap_counts_domains_times_zones(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    links = " ".join(f"http://site{n}.example/" for n in range(40))
    result = await check_body(plain(links), [DBL, URIBL], make(dns_server), max_lookups=7)
    assert len(lookups(dns_server, "dbl.bl.test")) == 3 and len(lookups(dns_server, "multi.uribl.test")) == 3
    assert len(dns_server.queries) == 6 and result.dns_lookups == 6


async def test_under_the_cap_nothing_is_truncated(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    result = await check_body(plain("http://a.example/ http://b.example/"), [DBL], make(dns_server), max_lookups=2)
    assert result.details["truncated"] is False and len(dns_server.queries) == 2


async def test_no_links_is_none_without_queries(dns_server: DnsServer) -> None:
    result = await check_body(plain("no links here, just words. and a@b.example"), [DBL], make(dns_server))
    assert (result.result, result.action) == ("none", Action.NONE)
    assert dns_server.queries == []


async def test_error_code_is_an_alert_not_a_listing(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "spam.example.dbl.bl.test. 300 IN A 127.255.255.254\n")
    result = await check_body(plain("http://spam.example/"), [DBL], make(dns_server))
    assert (result.result, result.action, result.score) == ("error", Action.NONE, 0.0)
    assert "dbl.bl.test" in result.details["alerts"][0] and "127.255.255.254" in result.details["alerts"][0]


async def test_a_zone_listing_invalid_gives_errors_not_listings(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + """
invalid.dbl.bl.test. 300 IN A 127.0.1.2
innocent.example.dbl.bl.test. 300 IN A 127.0.1.2
"""
    )
    result = await check_body(plain("http://innocent.example/"), [DBL], make(dns_server))
    assert (result.result, result.score, result.details["hits"]) == ("error", 0.0, [])


async def test_servfail_is_temperror_naming_the_zone(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    dns_server.servfail.add("spam.example.dbl.bl.test")
    result = await check_body(plain("http://spam.example/"), [DBL, URIBL], make(dns_server))
    assert (result.result, result.action) == ("temperror", Action.NONE)
    assert "dbl.bl.test" in result.reason and "multi.uribl.test" not in result.reason


# ---- extract_domains ------------------------------------------------------------------


def test_hosts_are_lowercased_idna_encoded_reduced_and_deduplicated() -> None:
    text = (
        "Visit HTTP://WWW.Example.CO.UK/x, then http://shop.example.co.uk/y and www.bücher.example.\n"
        "(https://evil.example) http://paypal.example@phish.example:8080/login "
        "http://192.0.2.1/ http://[2001:db8::1]/ hxxp://defanged.example http://localhost/ "
        "<http://bracket.example>"
    )
    assert extract_domains(plain(text), 20) == [
        "example.co.uk",
        "xn--bcher-kva.example",
        "evil.example",
        "phish.example",
        "bracket.example",
    ]


def test_limit_keeps_the_first_seen() -> None:
    text = " ".join(f"http://d{n}.example" for n in range(10))
    assert extract_domains(plain(text), 3) == ["d0.example", "d1.example", "d2.example"]
    assert extract_domains(plain(text), 0) == []


def test_html_entities_and_scheme_relative_links() -> None:
    html = (
        b'<a href="h&#116;tp://obfuscated.example/">x</a> <img src=//img.cdn.example/a.png>'
        b'<a href=\'https://quoted.example\'>y</a> <a href="/relative/path">z</a> <a href="mailto:a@mail.example">m</a>'
    )
    message = b"Content-Type: text/html\r\n\r\n" + html
    assert extract_domains(message, 10) == ["obfuscated.example", "quoted.example", "cdn.example"]


def test_only_text_parts_are_read_and_nested_messages_are_walked() -> None:
    inner = plain("inner http://inner.example/")
    message = multipart(
        part("application/octet-stream", b64(b"http://binary.example/"), "base64"),
        part("text/calendar", b"URL:http://calendar.example/"),
        part("message/rfc822", inner),
        boundary="outer",
    )
    assert extract_domains(message, 10) == ["inner.example"]


def test_unknown_charset_falls_back_without_losing_links() -> None:
    message = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nhttp://still.example/"
    assert extract_domains(message, 10) == ["still.example"]


def test_size_caps_bound_the_work() -> None:
    big = part("text/plain", b"http://big.example/ " + b"x" * 5000)
    small = part("text/plain", b"http://small.example/")
    message = multipart(big, small)
    assert extract_domains(message, 10, max_part_bytes=4096) == ["small.example"]
    late = plain("x" * 5000 + " http://late.example/ ")
    assert extract_domains(late, 10, max_total_bytes=4096) == []
    assert extract_domains(late, 10) == ["late.example"]
    many = multipart(*(part("text/plain", f"http://p{n}.example/".encode()) for n in range(20)))
    assert len(extract_domains(many, 100, max_parts=6)) == 5  # the multipart container is a part too


HOSTILE = [
    b"",
    b"\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\nhttp://x.example/\r\n",
    b'Content-Type: multipart/mixed; boundary="\r\n\r\nhttp://x.example/',
    b"Content-Type: /\r\n\r\nhttp://x.example/",
    b"Content-Type: text/plain; charset*=''\r\n\r\nhttp://x.example/",
    b"Content-Type: text/plain; charset*=utf-8''%\r\n\r\nhttp://x.example/",
    b"Content-Type: text/plain; =\r\n\r\nhttp://x.example/",
    b'Content-Type: text/plain;\r\n charset="\\\r\n\r\nhttp://x.example/',
    b'From: "\r\nTo: :;\r\nSubject: =?utf-8?q?=\r\n\r\nhttp://x.example/',
    b"To: a@\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!",
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nhttp://x.ex=\r\n=ZZ=\r\n",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n"
    + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 3000,
    b"Content-Type: message/rfc822\r\n\r\n" * 2000 + b"http://deep.example/",
    b"\xff\xfe\x00\x00" * 100,
    b"Content-Type: text/plain\r\n\r\nhttp://" + b"a." * 400 + b"example/ http://" + b"x" * 70 + b".example/",
    b"Content-Type: text/plain\r\n\r\nhttp://xn--.example/ www.\xe2\x80\x8f.example http://\xe2\x80\x8f\xef\xbc\x8e.example",
]


def test_invalid_punycode_is_dropped() -> None:
    message = plain(
        "http://xn--.example/ http://xn--zz-zzzz.example/ http://shop.xn--zz-zzzz/ http://xn--bcher-kva.example/"
    )
    assert extract_domains(message, 10) == ["xn--bcher-kva.example"]


# Shapes that cost the stdlib parser seconds to minutes per MiB (policy.default: ~160 s for the first).
COSTLY = {
    "content_type_params": b"Content-Type: text/plain; " + b"a=b; " * 200_000 + b"\r\n\r\nhttp://x.example/",
    "content_type_semicolons": b"Content-Type: multipart/mixed; boundary=a" + b";" * 1_000_000 + b"\r\n\r\n",
    "nested_comments": b"Content-Type: text/plain (" + b"(" * 100_000 + b"\r\n\r\nhttp://x.example/",
    "many_empty_parts": b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n\r\nx\r\n" * 100_000,
    "nested_parts": b"Content-Type: multipart/mixed; boundary=a\r\n\r\n"
    + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 20_000,
    "distinct_junk_hosts": b"Content-Type: text/plain\r\n\r\n" + b" ".join(b"www.%d" % n for n in range(100_000)),
}


@pytest.mark.parametrize("message", COSTLY.values(), ids=COSTLY.keys())
def test_costly_structure_is_bounded(message: bytes) -> None:
    start = time.monotonic()
    domains = extract_domains(message, 5)
    assert time.monotonic() - start < 5.0  # a generous bound: unbounded, these take seconds to minutes
    assert len(domains) <= 5


@pytest.mark.parametrize("message", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_mime_does_not_raise(dns_server: DnsServer, message: bytes) -> None:
    dns_server.add(SOA)
    domains = extract_domains(message, 5)
    assert len(domains) <= 5 and all(d.isascii() and d == d.lower() for d in domains)
    result = await check_body(message, [DBL], make(dns_server), max_lookups=5)
    assert result.result in ("none", "clean") and result.action is Action.NONE


@PROPS
@given(message=st.binary(max_size=4000), limit=st.integers(min_value=0, max_value=8))
@example(message=b"Content-Type: text/plain; charset*=''\r\n\r\nhttp://x.example/", limit=1)
def test_property_any_bytes_never_raise_and_respect_the_limit(message: bytes, limit: int) -> None:
    domains = extract_domains(message, limit)
    assert len(domains) <= limit
    assert len(set(domains)) == len(domains)


FRAGMENTS = st.sampled_from(
    [
        "Content-Type: multipart/mixed; boundary=b\r\n",
        "Content-Type: text/html; charset=utf-8\r\n",
        "Content-Type: text/plain; charset*=utf-8''%ZZ\r\n",
        "Content-Transfer-Encoding: base64\r\n",
        "Content-Transfer-Encoding: quoted-printable\r\n",
        'From: "broken <\r\n',
        "\r\n",
        "--b\r\n",
        "--b--\r\n",
        "http://a.example/",
        "https://b.example.co.uk:99/x",
        "www.c.example ",
        "<a href='//d.example'>",
        "=\r\n",
        "=3D",
        "aHR0cDovL2UuZXhhbXBsZS8=\r\n",
        "http://bücher.example/",
        "http://[::1]/",
    ]
)


@PROPS
@given(pieces=st.lists(st.one_of(FRAGMENTS, st.text(max_size=20)), max_size=40), limit=st.integers(0, 6))
def test_property_mime_shaped_input_gives_registrable_ascii_domains(pieces: list[str], limit: int) -> None:
    domains = extract_domains("".join(pieces).encode("utf-8", "surrogateescape"), limit)
    assert len(domains) <= limit and len(set(domains)) == len(domains)
    for d in domains:
        assert d.isascii() and d == d.lower() and "." in d and len(d) <= 253
