"""DNSBL checks against a real DNS server: Spamhaus-style codes, errors that are never listings, outages."""

from __future__ import annotations

import logging

import pytest

from mailwarden.checks.dnsbl import (
    PRESETS,
    SPAMHAUS_DBL,
    SPAMHAUS_ZEN,
    DnsblConfigError,
    check_domain,
    check_ip,
    parse_zone,
    parse_zones,
    reversed_ip,
    zone_is_sane,
)
from mailwarden.checks.result import Action
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

ZEN = parse_zone({"preset": "spamhaus-zen", "name": "zen.bl.test"})
DBL = parse_zone({"preset": "spamhaus-dbl", "name": "dbl.bl.test"})
LOCAL = parse_zone(
    {
        "name": "local.bl.test",
        "kind": "ip",
        "codes": {"127.0.0.2": {"meaning": "seen in our traps", "score": 2.5, "action": "quarantine"}},
    }
)

# Negative answers are not cached (SOA minimum 0), so the counts below measure our own caching.
SOA = """
bl.test. 300 IN SOA ns.bl.test. admin.bl.test. 1 3600 600 86400 0
"""

V6 = "2001:db8::25"
V6_NIBBLES = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"


def make(dns_server: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver([dns_server.address], timeout=timeout)


def asked(dns_server: DnsServer, suffix: str) -> list[str]:
    return [name for name, _ in dns_server.queries if name.endswith(suffix)]


# ---- IP lists ---------------------------------------------------------------------


async def test_ipv4_listing_maps_the_zen_code(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "99.2.0.192.zen.bl.test. 300 IN A 127.0.0.2\n")
    result = await check_ip("192.0.2.99", [ZEN], make(dns_server))
    assert (result.check, result.result, result.action, result.score) == ("dnsbl", "listed", Action.REJECT, 6.0)
    assert "192.0.2.99 is listed in zen.bl.test" in result.reason and "SBL" in result.reason
    assert result.auth_results == ()
    [hit] = result.details["hits"]
    assert hit == {
        "zone": "zen.bl.test",
        "subject": "192.0.2.99",
        "query": "99.2.0.192.zen.bl.test",
        "code": "127.0.0.2",
        "meaning": SPAMHAUS_ZEN["codes"]["127.0.0.2"]["meaning"],
        "score": 6.0,
        "action": "reject",
    }
    assert result.details["alerts"] == [] and result.dns_lookups >= 1


async def test_ipv6_is_queried_as_32_reversed_nibbles(dns_server: DnsServer) -> None:
    dns_server.add(SOA + f"{V6_NIBBLES}.zen.bl.test. 300 IN A 127.0.0.3\n")
    assert reversed_ip(V6) == V6_NIBBLES and len(V6_NIBBLES.split(".")) == 32
    result = await check_ip(V6, [ZEN], make(dns_server))
    assert (result.result, result.action, result.score) == ("listed", Action.JUNK, 4.0)
    assert "CSS" in result.reason
    assert asked(dns_server, "zen.bl.test")[0] == f"{V6_NIBBLES}.zen.bl.test"


async def test_ipv4_mapped_ipv6_is_queried_as_ipv4(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "99.2.0.192.zen.bl.test. 300 IN A 127.0.0.10\n")
    result = await check_ip("::ffff:192.0.2.99", [ZEN], make(dns_server))
    assert (result.result, result.action) == ("listed", Action.JUNK) and "PBL" in result.reason


async def test_codes_and_zones_combine_scores_add_and_strongest_action_wins(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + """
99.2.0.192.zen.bl.test. 300 IN A 127.0.0.10
99.2.0.192.zen.bl.test. 300 IN A 127.0.0.4
99.2.0.192.local.bl.test. 300 IN A 127.0.0.2
"""
    )
    result = await check_ip("192.0.2.99", [ZEN, LOCAL], make(dns_server))
    assert result.result == "listed"
    assert result.score == pytest.approx(3.0 + 6.0 + 2.5)
    assert result.action is Action.REJECT  # XBL's reject beats PBL's junk and the local quarantine
    assert sorted((h["zone"], h["code"]) for h in result.details["hits"]) == [
        ("local.bl.test", "127.0.0.2"),
        ("zen.bl.test", "127.0.0.10"),
        ("zen.bl.test", "127.0.0.4"),
    ]
    assert "zen.bl.test" in result.reason and "local.bl.test" in result.reason
    assert "XBL" in result.reason and "PBL" in result.reason and "seen in our traps" in result.reason


async def test_unlisted_is_clean(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    result = await check_ip("192.0.2.1", [ZEN, LOCAL], make(dns_server))
    assert (result.result, result.action, result.score) == ("clean", Action.NONE, 0.0)
    assert result.details["hits"] == [] and result.details["alerts"] == []
    assert sorted(asked(dns_server, "bl.test")) == ["1.2.0.192.local.bl.test", "1.2.0.192.zen.bl.test"]


async def test_an_unknown_code_uses_the_zone_default(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "99.2.0.192.zen.bl.test. 300 IN A 127.0.0.42\n")
    result = await check_ip("192.0.2.99", [ZEN], make(dns_server))
    assert (result.result, result.action, result.score) == ("listed", Action.NONE, 1.0)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ("127.255.255.254", "public or open resolver"),
        ("127.255.255.252", "typo"),
        ("127.255.255.255", "excessive"),
        ("127.255.255.7", "error code"),
        ("198.51.100.7", "outside 127.0.0.0/8"),
    ],
)
async def test_error_answers_are_alerts_never_listings(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture, answer: str, words: str
) -> None:
    dns_server.add(SOA + f"99.2.0.192.zen.bl.test. 300 IN A {answer}\n")
    with caplog.at_level(logging.ERROR, logger="mailwarden"):
        result = await check_ip("192.0.2.99", [ZEN], make(dns_server))
    assert (result.result, result.action, result.score) == ("error", Action.NONE, 0.0)
    assert result.details["hits"] == []
    [alert] = result.details["alerts"]
    assert "zen.bl.test" in alert and answer in alert and words in alert
    assert "zen.bl.test" in result.reason
    [record] = [r for r in caplog.records if "event=dnsbl_error" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "zone=zen.bl.test" in record.getMessage() and f"answer={answer}" in record.getMessage()


async def test_an_error_code_next_to_a_listing_spoils_the_whole_answer(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + """
99.2.0.192.zen.bl.test. 300 IN A 127.0.0.2
99.2.0.192.zen.bl.test. 300 IN A 127.255.255.254
"""
    )
    result = await check_ip("192.0.2.99", [ZEN], make(dns_server))
    assert (result.result, result.score, result.details["hits"]) == ("error", 0.0, [])


async def test_error_in_one_zone_does_not_hide_a_listing_in_another(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + """
99.2.0.192.zen.bl.test. 300 IN A 127.255.255.254
99.2.0.192.local.bl.test. 300 IN A 127.0.0.2
"""
    )
    result = await check_ip("192.0.2.99", [ZEN, LOCAL], make(dns_server))
    assert (result.result, result.action, result.score) == ("listed", Action.QUARANTINE, 2.5)
    assert len(result.details["alerts"]) == 1 and "zen.bl.test" in result.details["alerts"][0]


# ---- sanity (RFC 5782 §5) ---------------------------------------------------------

LISTS_EVERYTHING = """
1.0.0.127.zen.bl.test. 300 IN A 127.0.0.2
99.2.0.192.zen.bl.test. 300 IN A 127.0.0.2
"""


async def test_a_zone_listing_127_0_0_1_is_not_sane_and_its_listings_are_errors(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.add(SOA + LISTS_EVERYTHING)
    r = make(dns_server)
    with caplog.at_level(logging.ERROR, logger="mailwarden"):
        assert await zone_is_sane(ZEN, r) is False
        result = await check_ip("192.0.2.99", [ZEN], r)
    assert (result.result, result.action, result.score) == ("error", Action.NONE, 0.0)
    assert result.details["hits"] == []
    assert "lists everything" in result.details["alerts"][0] and "1.0.0.127.zen.bl.test" in result.details["alerts"][0]
    assert any("event=dnsbl_insane" in rec.getMessage() for rec in caplog.records)


async def test_an_insane_zone_is_caught_on_the_first_hit_without_a_prior_probe(dns_server: DnsServer) -> None:
    dns_server.add(SOA + LISTS_EVERYTHING)
    result = await check_ip("192.0.2.99", [ZEN], make(dns_server))
    assert result.result == "error" and result.details["hits"] == []


async def test_a_sane_zone_is_probed_once_and_the_verdict_cached(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "99.2.0.192.zen.bl.test. 300 IN A 127.0.0.2\n127.0.0.2.zen.bl.test. 300 IN A 127.0.0.2\n")
    r = make(dns_server)
    assert await zone_is_sane(ZEN, r) is True
    for _ in range(3):
        assert (await check_ip("192.0.2.99", [ZEN], r)).result == "listed"
    assert await zone_is_sane(ZEN, r) is True
    assert asked(dns_server, "zen.bl.test").count("1.0.0.127.zen.bl.test") == 1


async def test_refresh_asks_again_and_sees_a_zone_go_bad(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    r = make(dns_server)
    assert await zone_is_sane(ZEN, r) is True
    dns_server.add(LISTS_EVERYTHING)
    assert await zone_is_sane(ZEN, r) is True  # cached verdict
    assert await zone_is_sane(ZEN, r, refresh=True) is False


async def test_a_domain_zone_listing_invalid_is_not_sane(dns_server: DnsServer) -> None:
    # RFC 5782 §5: a domain list MUST list TEST and MUST NOT list INVALID.
    dns_server.add(SOA + "test.dbl.bl.test. 300 IN A 127.0.1.2\n")
    r = make(dns_server)
    assert await zone_is_sane(DBL, r) is True
    dns_server.add("invalid.dbl.bl.test. 300 IN A 127.0.1.2\nspammer.example.dbl.bl.test. 300 IN A 127.0.1.2\n")
    assert await zone_is_sane(DBL, r, refresh=True) is False
    result = await check_domain("spammer.example", [DBL], r)
    assert result.result == "error" and result.score == 0.0


async def test_sanity_probe_outage_keeps_the_last_verdict(dns_server: DnsServer) -> None:
    dns_server.add(SOA + LISTS_EVERYTHING)
    r = make(dns_server)
    assert await zone_is_sane(ZEN, r) is False
    dns_server.servfail.add("1.0.0.127.zen.bl.test")
    assert await zone_is_sane(ZEN, r, refresh=True) is False


# ---- outages ----------------------------------------------------------------------


async def test_servfail_is_temperror_with_no_action(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    dns_server.servfail.add("99.2.0.192.zen.bl.test")
    result = await check_ip("192.0.2.99", [ZEN, LOCAL], make(dns_server))
    assert (result.result, result.action, result.score) == ("temperror", Action.NONE, 0.0)
    assert "zen.bl.test" in result.reason and "local.bl.test" not in result.reason
    assert [t["zone"] for t in result.details["temperrors"]] == ["zen.bl.test"]
    assert "SERVFAIL" in result.details["temperrors"][0]["reason"]


async def test_timeout_is_temperror_with_no_action(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    dns_server.silent.add("99.2.0.192.zen.bl.test")
    result = await check_ip("192.0.2.99", [ZEN], make(dns_server, timeout=0.3))
    assert (result.result, result.action) == ("temperror", Action.NONE)
    assert "zen.bl.test" in result.reason and "timed out" in result.reason


async def test_a_listing_in_one_zone_wins_over_an_outage_in_another(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "99.2.0.192.local.bl.test. 300 IN A 127.0.0.2\n")
    dns_server.servfail.add("99.2.0.192.zen.bl.test")
    result = await check_ip("192.0.2.99", [ZEN, LOCAL], make(dns_server))
    assert (result.result, result.action) == ("listed", Action.QUARANTINE)
    assert [t["zone"] for t in result.details["temperrors"]] == ["zen.bl.test"]


# ---- domain lists (HELO, MAIL FROM) ---------------------------------------------------


async def test_dbl_listed_helo_is_looked_up_by_registrable_domain(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "spammer.example.dbl.bl.test. 300 IN A 127.0.1.2\n")
    result = await check_domain("MX3.Mail.Spammer.Example.", [DBL, ZEN], make(dns_server))
    assert (result.check, result.result, result.action, result.score) == ("dnsbl", "listed", Action.REJECT, 6.0)
    assert "spammer.example is listed in dbl.bl.test" in result.reason and "spam domain" in result.reason
    assert result.details["registrable"] == "spammer.example"
    # ZEN is an IP zone: not asked. The hit makes us probe DBL's negative test entry once.
    assert asked(dns_server, "bl.test") == ["spammer.example.dbl.bl.test", "invalid.dbl.bl.test"]


async def test_dbl_listed_mail_from_domain(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "phish.co.uk.dbl.bl.test. 300 IN A 127.0.1.4\n")
    result = await check_domain("billing@secure.phish.co.uk", [DBL], make(dns_server))
    assert (result.result, result.action, result.score) == ("listed", Action.REJECT, 8.0)
    assert "phish.co.uk is listed in dbl.bl.test" in result.reason and "phishing" in result.reason


async def test_dbl_abused_legit_codes_do_not_reject(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "hosting.example.dbl.bl.test. 300 IN A 127.0.1.102\n")
    result = await check_domain("hosting.example", [DBL], make(dns_server))
    assert (result.result, result.action, result.score) == ("listed", Action.JUNK, 2.0)


async def test_dbl_ip_queries_prohibited_is_an_error(dns_server: DnsServer) -> None:
    dns_server.add(SOA + "odd.example.dbl.bl.test. 300 IN A 127.0.1.255\n")
    result = await check_domain("odd.example", [DBL], make(dns_server))
    assert (result.result, result.score) == ("error", 0.0)
    assert "IP queries prohibited" in result.details["alerts"][0]


async def test_unlisted_domain_is_clean(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    result = await check_domain("example.org", [DBL], make(dns_server))
    assert (result.result, result.action) == ("clean", Action.NONE)


@pytest.mark.parametrize("helo", ["[192.0.2.1]", "192.0.2.1", "localhost", "co.uk", "", "a..b.example", "x" * 300])
async def test_names_without_a_registrable_domain_are_not_looked_up(dns_server: DnsServer, helo: str) -> None:
    result = await check_domain(helo, [DBL], make(dns_server))
    assert (result.result, result.action) == ("none", Action.NONE)
    assert dns_server.queries == []


async def test_a_name_too_long_for_the_zone_is_skipped_not_an_error(dns_server: DnsServer) -> None:
    long_zone = parse_zone({"name": ".".join(["z" * 60] * 3) + ".bl.test", "kind": "domain"})
    long_domain = "a" * 60 + ".example"  # fine alone; 253+ characters with the zone appended
    result = await check_domain(long_domain, [long_zone], make(dns_server))
    assert result.result == "clean" and result.details["errors"] == [] and result.details["alerts"] == []
    assert [s["subject"] for s in result.details["skipped"]] == [long_domain]
    assert dns_server.queries == []


async def test_not_an_ip_is_none_without_a_query(dns_server: DnsServer) -> None:
    result = await check_ip("not-an-ip", [ZEN], make(dns_server))
    assert result.result == "none" and dns_server.queries == []


# ---- configuration ----------------------------------------------------------------


def test_presets_parse_and_hold_the_documented_codes() -> None:
    zen, dbl = parse_zones([SPAMHAUS_ZEN, SPAMHAUS_DBL])
    assert set(PRESETS) == {"spamhaus-zen", "spamhaus-dbl"}
    assert (zen.name, zen.kind, dbl.name, dbl.kind) == ("zen.spamhaus.org", "ip", "dbl.spamhaus.org", "domain")
    assert sorted(zen.codes, key=lambda c: int(c.rsplit(".", 1)[1])) == [
        f"127.0.0.{n}" for n in (2, 3, 4, 5, 6, 7, 9, 10, 11)
    ]
    assert sorted(dbl.codes, key=lambda c: int(c.rsplit(".", 1)[1])) == [
        f"127.0.1.{n}" for n in (2, 4, 5, 6, 102, 103, 104, 105, 106)
    ]
    assert zen.codes["127.0.0.9"].action is Action.REJECT and dbl.codes["127.0.1.102"].action is Action.JUNK


def test_a_preset_can_be_renamed_for_a_dqs_key() -> None:
    zone = parse_zone({"preset": "spamhaus-zen", "name": "KEY123.zen.dq.spamhaus.net."})
    assert zone.name == "key123.zen.dq.spamhaus.net" and zone.codes == ZEN.codes


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"name": "x.bl.test", "kind": "url"}, "'kind' must be 'ip' or 'domain'"),
        ({"name": "", "kind": "ip"}, "'name' must be a non-empty string"),
        ({"name": "bl", "kind": "ip"}, "at least two labels"),
        ({"name": "b l.test", "kind": "ip"}, "characters DNS names cannot hold"),
        ({"name": "x.bl.test", "kind": "ip", "codes": {"10.0.0.2": {"meaning": "m", "score": 1}}}, "outside 127"),
        ({"name": "x.bl.test", "kind": "ip", "codes": {"127.255.255.2": {"meaning": "m"}}}, "reserved for errors"),
        ({"name": "x.bl.test", "kind": "ip", "codes": {"nope": {"meaning": "m"}}}, "not an IPv4 address"),
        ({"name": "x.bl.test", "kind": "ip", "codes": {"127.0.0.2": {"meaning": "m", "score": "9"}}}, "'score'"),
        ({"name": "x.bl.test", "kind": "ip", "codes": {"127.0.0.2": {"meaning": "m", "action": "drop"}}}, "'action'"),
        (
            {"name": "x.bl.test", "kind": "ip", "codes": {"127.0.0.2": {"meaning": "m", "action": "tempfail"}}},
            "tempfail",
        ),
        ({"name": "x.bl.test", "kind": "ip", "codes": {"127.0.0.2": {"score": 1}}}, "'meaning'"),
        ({"name": "x.bl.test", "kind": "ip", "codes": {"127.0.0.2": {"meaning": "m", "colour": 1}}}, "colour"),
        ({"name": "x.bl.test", "kind": "ip", "default": {"meaning": "m", "score": float("nan")}}, "'default'"),
        ({"name": "x.bl.test", "kind": "ip", "typo_key": 1}, "unknown key(s) typo_key"),
        ({"preset": "spamhaus-nope", "name": "x.bl.test"}, "unknown preset"),
    ],
)
def test_config_errors_name_the_zone_and_the_problem(data: dict[str, object], problem: str) -> None:
    with pytest.raises(DnsblConfigError) as info:
        parse_zone(data)
    message = str(info.value)
    assert problem in message
    if data.get("name"):
        assert repr(str(data["name"])) in message


def test_a_zone_listed_twice_is_refused() -> None:
    with pytest.raises(DnsblConfigError, match=r"zen\.spamhaus\.org.*twice"):
        parse_zones([SPAMHAUS_ZEN, {"preset": "spamhaus-zen"}])
