"""SPF beyond the conformance suite: limits enforced before queries are sent, errors, and the CheckResult."""

from __future__ import annotations

from mailwarden.checks.spf import check_host, evaluate_spf
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

SOA = "example.test. 300 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60\n"


def make(dns_server: DnsServer, zone: str, timeout: float = 2.0) -> Resolver:
    dns_server.add(SOA + zone)
    return Resolver([dns_server.address], timeout=timeout)


def asked(dns_server: DnsServer, rdtype: str) -> list[str]:
    return [name for name, t in dns_server.queries if t == rdtype]


async def test_the_eleventh_dns_term_is_refused_before_its_query(dns_server: DnsServer) -> None:
    terms = " ".join(f"a:h{n}.example.test" for n in range(1, 12))
    hosts = "".join(f"h{n}.example.test. 300 IN A 192.0.2.{n}\n" for n in range(1, 12))
    r = make(dns_server, f'example.test. 300 IN TXT "v=spf1 {terms} -all"\n' + hosts)
    checked = await evaluate_spf("198.51.100.1", "mail.example.net", "alice@example.test", r)
    assert checked.result == "permerror"
    assert "a:h11.example.test" in checked.reason and "limit is 10" in checked.reason
    assert asked(dns_server, "A") == [f"h{n}.example.test" for n in range(1, 11)]  # no 11th lookup was sent
    assert checked.details["lookups"] == 10
    assert checked.dns_lookups == 11  # the record, then ten mechanisms


async def test_include_loop_ends_in_permerror_through_the_limit(dns_server: DnsServer) -> None:
    r = make(
        dns_server,
        'example.test. 300 IN TXT "v=spf1 include:loop.example.test -all"\n'
        'loop.example.test. 300 IN TXT "v=spf1 ip4:192.0.2.1 include:example.test ~all"\n',
    )
    checked = await evaluate_spf("198.51.100.1", "mail.example.net", "alice@example.test", r)
    assert checked.result == "permerror"
    assert "limit is 10" in checked.reason
    assert checked.details["lookups"] == 10
    assert len(dns_server.queries) == 2  # each record asked once; the cache answers the rest


async def test_redirect_loop_ends_in_permerror(dns_server: DnsServer) -> None:
    r = make(dns_server, 'example.test. 300 IN TXT "v=spf1 ip4:192.0.2.1 redirect=example.test"\n')
    checked = await check_host("198.51.100.1", "example.test", "alice@example.test", r)
    assert (checked.result, checked.lookups) == ("permerror", 10)


async def test_the_third_void_lookup_is_a_permerror_and_nothing_is_asked_after_it(dns_server: DnsServer) -> None:
    r = make(
        dns_server,
        'example.test. 300 IN TXT "v=spf1 a:v1.example.test mx:v2.example.test exists:v3.example.test '
        'a:real.example.test -all"\n'
        "v2.example.test. 300 IN A 192.0.2.2\n"  # exists, but has no MX: a void lookup all the same
        "real.example.test. 300 IN A 198.51.100.1\n",
    )
    checked = await check_host("198.51.100.1", "example.test", "alice@example.test", r)
    assert checked.result == "permerror"
    assert "v3.example.test/A is void lookup number 3" in checked.reason
    assert ("real.example.test", "A") not in dns_server.queries
    assert checked.void_lookups == 3


async def test_two_void_lookups_are_allowed(dns_server: DnsServer) -> None:
    r = make(
        dns_server,
        'example.test. 300 IN TXT "v=spf1 a:v1.example.test a:v2.example.test a:real.example.test -all"\n'
        "real.example.test. 300 IN A 198.51.100.1\n",
    )
    checked = await check_host("198.51.100.1", "example.test", "alice@example.test", r)
    assert (checked.result, checked.mechanism, checked.void_lookups) == ("pass", "a:real.example.test", 2)


async def test_more_than_ten_mx_names_is_a_permerror_before_any_address_lookup(dns_server: DnsServer) -> None:
    mx = "".join(f"example.test. 300 IN MX {n} mx{n}.example.test.\n" for n in range(11))
    hosts = "".join(f"mx{n}.example.test. 300 IN A 198.51.100.1\n" for n in range(11))
    r = make(dns_server, 'example.test. 300 IN TXT "v=spf1 mx -all"\n' + mx + hosts)
    checked = await check_host("198.51.100.1", "example.test", "alice@example.test", r)
    assert checked.result == "permerror" and "11 MX records" in checked.reason
    assert asked(dns_server, "A") == []


async def test_servfail_is_temperror_never_none(dns_server: DnsServer) -> None:
    r = make(dns_server, 'example.test. 300 IN TXT "v=spf1 -all"\n')
    dns_server.servfail.add("example.test")
    checked = await evaluate_spf("192.0.2.1", "mail.example.net", "alice@example.test", r)
    assert checked.result == "temperror"
    assert "SERVFAIL" in checked.reason
    assert checked.auth_results == ("spf=temperror smtp.mailfrom=example.test",)


async def test_servfail_in_a_mechanism_or_include_is_temperror(dns_server: DnsServer) -> None:
    r = make(
        dns_server,
        'example.test. 300 IN TXT "v=spf1 ip4:192.0.2.1 a:broken.example.test -all"\n'
        'inc.example.test. 300 IN TXT "v=spf1 include:broken.example.test -all"\n',
    )
    dns_server.servfail.add("broken.example.test")
    assert (await check_host("198.51.100.1", "example.test", "a@example.test", r)).result == "temperror"
    assert (await check_host("198.51.100.1", "inc.example.test", "a@inc.example.test", r)).result == "temperror"
    # a match before the broken mechanism decides without asking it
    assert (await check_host("192.0.2.1", "example.test", "a@example.test", r)).result == "pass"


async def test_broken_explanation_still_fails_without_explanation(dns_server: DnsServer) -> None:
    r = make(dns_server, 'example.test. 300 IN TXT "v=spf1 -all exp=why.example.test"\n')
    dns_server.servfail.add("why.example.test")
    checked = await check_host("198.51.100.1", "example.test", "alice@example.test", r)
    assert (checked.result, checked.explanation) == ("fail", None)


async def test_silent_server_is_temperror(dns_server: DnsServer) -> None:
    r = make(dns_server, "", timeout=0.2)
    dns_server.silent.add("example.test")
    checked = await check_host("198.51.100.1", "example.test", "alice@example.test", r)
    assert checked.result == "temperror" and "timed out" in checked.reason


async def test_overall_time_limit_is_temperror(dns_server: DnsServer) -> None:
    r = make(dns_server, "", timeout=5.0)
    dns_server.silent.add("example.test")
    checked = await check_host("198.51.100.1", "example.test", "alice@example.test", r, timeout=0.3)
    assert checked.result == "temperror" and "longer than 0.3 s" in checked.reason


async def test_check_result_names_the_matching_mechanism(dns_server: DnsServer) -> None:
    r = make(
        dns_server,
        'example.test. 300 IN TXT "v=spf1 -ip4:192.0.2.66 include:_spf.example.test -all"\n'
        'example.test. 300 IN TXT "unrelated=text"\n'
        '_spf.example.test. 300 IN TXT "v=spf1 ip4:192.0.2.0/24 ~all"\n',
    )
    checked = await evaluate_spf("192.0.2.5", "mail.example.net", "<alice@example.test>", r)
    assert checked.check == "spf"
    assert checked.result == "pass"
    assert (
        checked.reason
        == "192.0.2.5 matched include:_spf.example.test (example.test) > ip4:192.0.2.0/24 (_spf.example.test)"
    )
    assert checked.auth_results == ("spf=pass smtp.mailfrom=example.test",)
    assert checked.details["identity"] == "mailfrom"
    assert checked.details["domain"] == "example.test"
    assert checked.details["mechanism"] == "ip4:192.0.2.0/24"
    assert checked.details["explanation"] is None
    assert (checked.details["lookups"], checked.dns_lookups) == (1, 2)

    refused = await evaluate_spf("192.0.2.66", "mail.example.net", "alice@example.test", r)
    assert (refused.result, refused.details["mechanism"]) == ("fail", "-ip4:192.0.2.66")
    assert refused.reason == "192.0.2.66 matched -ip4:192.0.2.66 (example.test)"

    nothing = await evaluate_spf("192.0.2.66", "mail.example.net", "bob@nothing.example.test", r)
    assert nothing.result == "none" and "nothing.example.test does not exist" in nothing.reason


async def test_null_sender_checks_the_helo_identity(dns_server: DnsServer) -> None:
    r = make(dns_server, 'mail.example.test. 300 IN TXT "v=spf1 a -all"\nmail.example.test. 300 IN A 192.0.2.25\n')
    for null in ("", "<>"):
        checked = await evaluate_spf("192.0.2.25", "mail.example.test", null, r)
        assert checked.result == "pass"
        assert checked.auth_results == ("spf=pass smtp.helo=mail.example.test",)
        assert checked.details["identity"] == "helo"
    literal = await evaluate_spf("192.0.2.25", "[192.0.2.25]", "", r)
    assert literal.result == "none"
    assert literal.auth_results == ('spf=none smtp.helo="[192.0.2.25]"',)
    assert (await evaluate_spf("192.0.2.25", None, "", r)).result == "none"
    assert (await evaluate_spf("unix-socket", "mail.example.test", "", r)).result == "none"


async def test_explanation_expands_the_rfc_7208_section_7_4_examples(dns_server: DnsServer) -> None:
    macros = (
        "%{s} %{o} %{d} %{d4} %{d3} %{d2} %{d1} %{dr} %{d2r} %{l} %{l-} %{lr} %{lr-} %{l1r-} "
        "%{ir}.%{v}._spf.%{d2} %{lr-}.lp._spf.%{d2} %{lr-}.lp.%{ir}.%{v}._spf.%{d2} "
        "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2} %{d2}.trusted-domains.example.net"
    )
    expected = (
        "strong-bad@email.example.com email.example.com email.example.com email.example.com email.example.com "
        "example.com com com.example.email example.email strong-bad strong.bad strong-bad bad.strong strong "
        "3.2.0.192.in-addr._spf.example.com bad.strong.lp._spf.example.com "
        "bad.strong.lp.3.2.0.192.in-addr._spf.example.com 3.2.0.192.in-addr.strong.lp._spf.example.com "
        "example.com.trusted-domains.example.net"
    )
    half = len(macros) // 2
    r = make(
        dns_server,
        'email.example.com. 300 IN TXT "v=spf1 -all exp=why.example.com"\n'
        f'why.example.com. 300 IN TXT "{macros[:half]}" "{macros[half:]}"\n'
        'v6.example.com. 300 IN TXT "v=spf1 -all exp=why6.example.com"\n'
        'why6.example.com. 300 IN TXT "%{ir}.%{v}._spf.%{d2} %{c} %{L} %{r}"\n',
    )
    checked = await check_host("192.0.2.3", "email.example.com", "strong-bad@email.example.com", r)
    assert (checked.result, checked.explanation) == ("fail", expected)

    checked = await check_host("2001:db8::cb01", "v6.example.com", "a b@v6.example.com", r, receiver="mx.test")
    assert checked.explanation == (
        "1.0.B.C.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2.ip6._spf.example.com "
        "2001:db8::cb01 a%20b mx.test"
    )


async def test_macro_target_names_are_asked_as_expanded(dns_server: DnsServer) -> None:
    r = make(
        dns_server,
        'example.test. 300 IN TXT "v=spf1 exists:%{ir}.%{l1+}._spf.%{d} -all"\n'
        "5.2.0.192.alice._spf.example.test. 300 IN A 127.0.0.2\n",
    )
    checked = await check_host("192.0.2.5", "example.test", "bob+alice@example.test", r)
    assert checked.result == "pass"
    assert ("5.2.0.192.alice._spf.example.test", "A") in dns_server.queries


async def test_ptr_checks_at_most_ten_names_and_skips_unvalidated_ones(dns_server: DnsServer) -> None:
    ptrs = "".join(f"5.2.0.192.in-addr.arpa. 300 IN PTR h{n}.example.test.\n" for n in range(12))
    r = make(
        dns_server,
        'example.test. 300 IN TXT "v=spf1 ptr -all"\n'
        + ptrs
        + "h0.example.test. 300 IN A 192.0.2.99\n"  # does not point back: not validated
        + "h11.example.test. 300 IN A 192.0.2.5\n",  # would validate, but is the twelfth name
    )
    checked = await check_host("192.0.2.5", "example.test", "alice@example.test", r)
    assert checked.result == "fail"
    assert ("h11.example.test", "A") not in dns_server.queries
