"""DMARC (RFC 7489) against a real DNS server: discovery, alignment, policy, pct."""

from __future__ import annotations

import pytest

from mailwarden.checks.dmarc import (
    DkimIdentity,
    SpfIdentity,
    evaluate_dmarc,
    organizational_domain,
    parse_dmarc_record,
)
from mailwarden.checks.result import Action
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

SOA = "example.test. 300 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60\n"


def txt(name: str, *records: str) -> str:
    return "".join(f'{name}. 300 IN TXT "{r}"\n' for r in records)


def resolver(dns_server: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver([dns_server.address], timeout=timeout)


def never_sampled() -> float:
    raise AssertionError("rng must not be consulted")


SPF_NONE = SpfIdentity("none", "")


# ---- alignment ------------------------------------------------------------------------


async def test_relaxed_spf_alignment_passes_for_a_subdomain_of_the_same_org(dns_server: DnsServer) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject"))
    r = await evaluate_dmarc("example.test", SpfIdentity("pass", "bounce.example.test"), [], resolver(dns_server))
    assert (r.check, r.result, r.action) == ("dmarc", "pass", Action.NONE)
    assert r.auth_results == ("dmarc=pass (p=reject dis=none) header.from=example.test",)
    assert "SPF mfrom=bounce.example.test pass, aligned (aspf=r)" in r.reason
    assert r.details["spf"] == {"domain": "bounce.example.test", "scope": "mfrom", "result": "pass", "aligned": True}
    assert (r.details["spf_aligned"], r.details["dkim_aligned"]) == ("pass", "fail")


async def test_strict_spf_alignment_needs_the_exact_domain(dns_server: DnsServer) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject; aspf=s"))
    res = resolver(dns_server)
    r = await evaluate_dmarc("example.test", SpfIdentity("pass", "bounce.example.test"), [], res)
    assert (r.result, r.action) == ("fail", Action.REJECT)
    assert r.auth_results == ("dmarc=fail (p=reject dis=reject) header.from=example.test",)
    assert "SPF mfrom=bounce.example.test pass, not aligned (aspf=s)" in r.reason
    assert "policy p=reject" in r.reason
    r = await evaluate_dmarc("example.test", SpfIdentity("pass", "Example.TEST"), [], res)
    assert r.result == "pass"


async def test_relaxed_dkim_alignment_and_strict_dkim_alignment(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + txt("_dmarc.example.test", "v=DMARC1; p=quarantine")
        + txt("_dmarc.strict.example.test", "v=DMARC1; p=reject; adkim=s")
    )
    res = resolver(dns_server)
    sig = DkimIdentity("pass", "mail.example.test", "s1")
    r = await evaluate_dmarc("example.test", SPF_NONE, [sig], res)
    assert r.result == "pass"
    assert r.details["dkim"] == [{"domain": "mail.example.test", "selector": "s1", "result": "pass", "aligned": True}]

    r = await evaluate_dmarc("strict.example.test", SPF_NONE, [sig], res)
    assert (r.result, r.action) == ("fail", Action.REJECT)
    assert "DKIM d=mail.example.test pass, not aligned (adkim=s)" in r.reason
    r = await evaluate_dmarc("strict.example.test", SPF_NONE, [sig, DkimIdentity("pass", "strict.example.test")], res)
    assert r.result == "pass"


async def test_only_a_pass_counts_for_alignment(dns_server: DnsServer) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject"))
    r = await evaluate_dmarc(
        "example.test",
        SpfIdentity("softfail", "example.test"),
        [DkimIdentity("fail", "example.test"), DkimIdentity("neutral", "example.test")],
        resolver(dns_server),
    )
    assert (r.result, r.action) == ("fail", Action.REJECT)
    assert all(not row["aligned"] for row in r.details["dkim"])
    assert r.details["spf"]["aligned"] is False
    assert "does not count" in r.reason


@pytest.mark.parametrize(
    "signer",
    [
        "attacker.test",  # another organisation
        "example.test.attacker.test",  # our name as a label of theirs
        "attackerexample.test",
        "test",  # the public suffix itself
        "co.uk",
    ],
)
async def test_dkim_pass_for_another_org_domain_does_not_align(dns_server: DnsServer, signer: str) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject"))
    r = await evaluate_dmarc(
        "example.test", SpfIdentity("pass", signer), [DkimIdentity("pass", signer)], resolver(dns_server)
    )
    assert (r.result, r.action) == ("fail", Action.REJECT)
    assert r.details["dkim"][0]["aligned"] is False


async def test_private_public_suffixes_separate_organisations(dns_server: DnsServer) -> None:
    # github.io is in the PSL's private section: alice.github.io and mallory.github.io are different owners.
    assert organizational_domain("www.alice.github.io") == "alice.github.io"
    dns_server.add(txt("_dmarc.alice.github.io", "v=DMARC1; p=reject"))
    r = await evaluate_dmarc(
        "alice.github.io", SPF_NONE, [DkimIdentity("pass", "mallory.github.io")], resolver(dns_server)
    )
    assert (r.result, r.action) == ("fail", Action.REJECT)


async def test_helo_identity_counts_when_mail_from_was_null(dns_server: DnsServer) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject"))
    r = await evaluate_dmarc(
        "example.test", SpfIdentity("pass", "mx1.example.test", scope="helo"), [], resolver(dns_server)
    )
    assert r.result == "pass"
    assert r.details["spf"]["scope"] == "helo"


async def test_idn_from_domain_is_looked_up_as_a_labels(dns_server: DnsServer) -> None:
    dns_server.add(txt("_dmarc.xn--bcher-kva.test", "v=DMARC1; p=reject"))
    r = await evaluate_dmarc(
        "Bücher.test", SPF_NONE, [DkimIdentity("pass", "xn--bcher-kva.test")], resolver(dns_server)
    )
    assert r.result == "pass"
    assert r.auth_results[0].endswith("header.from=xn--bcher-kva.test")


# ---- discovery ----------------------------------------------------------------------


async def test_no_record_is_none(dns_server: DnsServer) -> None:
    dns_server.add(SOA)
    r = await evaluate_dmarc("mail.example.test", SPF_NONE, [], resolver(dns_server), rng=never_sampled)
    assert (r.result, r.action) == ("none", Action.NONE)
    assert r.auth_results == ("dmarc=none (p=none dis=none) header.from=mail.example.test",)
    assert "no DMARC record for mail.example.test or example.test" in r.reason
    assert ("_dmarc.mail.example.test", "TXT") in dns_server.queries
    assert ("_dmarc.example.test", "TXT") in dns_server.queries
    assert r.dns_lookups == 2


async def test_org_domain_record_applies_when_the_subdomain_has_none(dns_server: DnsServer) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject; rua=mailto:dmarc@example.test"))
    r = await evaluate_dmarc(
        "a.b.example.test", SpfIdentity("pass", "other.test"), [], resolver(dns_server), rng=never_sampled
    )
    assert (r.result, r.action) == ("fail", Action.REJECT)
    assert r.details["record_domain"] == "example.test"
    assert r.details["policy_tag"] == "sp"  # sp is absent, so it is p's value
    assert r.details["policy_published"]["sp"] == "reject"
    assert r.details["rua"] == ["mailto:dmarc@example.test"]
    assert "from _dmarc.example.test" in r.reason
    # RFC 7489 §6.6.3: the From domain, then straight to the organisational domain (no tree walk).
    assert [q for q in dns_server.queries if q[1] == "TXT"] == [
        ("_dmarc.a.b.example.test", "TXT"),
        ("_dmarc.example.test", "TXT"),
    ]


async def test_subdomain_gets_sp_and_its_own_record_gets_p(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + txt("_dmarc.example.test", "v=DMARC1; p=reject; sp=quarantine")
        + txt("_dmarc.own.example.test", "v=DMARC1; p=none; sp=reject")
    )
    res = resolver(dns_server)
    r = await evaluate_dmarc("news.example.test", SPF_NONE, [], res)
    assert (r.result, r.action) == ("fail", Action.JUNK)
    assert r.auth_results == ("dmarc=fail (p=quarantine dis=quarantine) header.from=news.example.test",)
    assert "policy sp=quarantine" in r.reason

    r = await evaluate_dmarc("example.test", SPF_NONE, [], res)
    assert (r.action, r.details["policy_tag"]) == (Action.REJECT, "p")

    r = await evaluate_dmarc("own.example.test", SPF_NONE, [], res)  # its own record: p, not the org's sp
    assert (r.result, r.action, r.details["policy_tag"]) == ("fail", Action.NONE, "p")
    assert r.details["record_domain"] == "own.example.test"


async def test_multiple_records_mean_no_policy_and_no_fallback(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + txt("_dmarc.example.test", "v=DMARC1; p=reject")
        + txt("_dmarc.twice.example.test", "v=DMARC1; p=reject", "v=DMARC1; p=none")
    )
    r = await evaluate_dmarc("twice.example.test", SPF_NONE, [], resolver(dns_server))
    assert (r.result, r.action) == ("none", Action.NONE)
    assert "2 DMARC records" in r.reason
    assert ("_dmarc.example.test", "TXT") not in dns_server.queries


async def test_records_not_starting_with_v_dmarc1_are_discarded(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + txt("_dmarc.example.test", "v=DMARC1; p=reject")
        + txt("_dmarc.sub.example.test", "v=spf1 -all", "p=none; v=DMARC1", "v=dmarc1; p=none")
        + txt("_dmarc.one.example.test", "v=spf1 -all", "v=DMARC1;p=quarantine")
    )
    res = resolver(dns_server)
    r = await evaluate_dmarc("sub.example.test", SPF_NONE, [], res)
    assert (r.action, r.details["record_domain"]) == (Action.REJECT, "example.test")
    r = await evaluate_dmarc("one.example.test", SPF_NONE, [], res)
    assert (r.action, r.details["record_domain"]) == (Action.JUNK, "one.example.test")


async def test_servfail_is_temperror_and_tempfail(dns_server: DnsServer) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject"))
    dns_server.servfail.add("_dmarc.example.test")
    res = resolver(dns_server)
    r = await evaluate_dmarc("example.test", SpfIdentity("pass", "example.test"), [], res)
    assert (r.result, r.action) == ("temperror", Action.TEMPFAIL)
    assert "SERVFAIL" in r.reason
    assert r.auth_results[0].startswith("dmarc=temperror ")
    # The subdomain has no record (NXDOMAIN), and the fallback to the org domain fails: still temperror.
    r = await evaluate_dmarc("sub.example.test", SPF_NONE, [], res)
    assert (r.result, r.action) == ("temperror", Action.TEMPFAIL)


async def test_timeout_is_temperror(dns_server: DnsServer) -> None:
    dns_server.silent.add("_dmarc.example.test")
    r = await evaluate_dmarc("example.test", SPF_NONE, [], resolver(dns_server, timeout=0.3))
    assert (r.result, r.action) == ("temperror", Action.TEMPFAIL)


# ---- policy ---------------------------------------------------------------------------


async def test_pct_zero_downgrades_reject_to_quarantine_and_quarantine_to_none(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + txt("_dmarc.example.test", "v=DMARC1; p=reject; pct=0")
        + txt("_dmarc.q.example.test", "v=DMARC1; p=quarantine; pct=0")
    )
    res = resolver(dns_server)
    r = await evaluate_dmarc("example.test", SPF_NONE, [], res, rng=lambda: 0.0)
    assert (r.result, r.action) == ("fail", Action.JUNK)
    assert r.auth_results == ("dmarc=fail (p=reject dis=quarantine) header.from=example.test",)
    assert (r.details["pct_applied"], r.details["override_reason"]) == (False, "sampled_out")
    assert "not sampled (pct=0)" in r.reason
    r = await evaluate_dmarc("q.example.test", SPF_NONE, [], res, rng=lambda: 0.0)
    assert (r.result, r.action, r.details["disposition"]) == ("fail", Action.NONE, "none")


async def test_pct_samples_with_the_injected_rng(dns_server: DnsServer) -> None:
    dns_server.add(SOA + txt("_dmarc.example.test", "v=DMARC1; p=reject; pct=30"))
    res = resolver(dns_server)
    assert (await evaluate_dmarc("example.test", SPF_NONE, [], res, rng=lambda: 0.29)).action == Action.REJECT
    assert (await evaluate_dmarc("example.test", SPF_NONE, [], res, rng=lambda: 0.30)).action == Action.JUNK
    # A pass never consults the sample.
    r = await evaluate_dmarc("example.test", SPF_NONE, [DkimIdentity("pass", "example.test")], res, rng=never_sampled)
    assert r.result == "pass"


async def test_invalid_policy_with_rua_acts_as_p_none_and_without_is_permerror(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + txt("_dmarc.example.test", "v=DMARC1; p=bogus; rua=mailto:agg@example.test")
        + txt("_dmarc.norua.example.test", "v=DMARC1; p=bogus")
        + txt("_dmarc.badsp.example.test", "v=DMARC1; p=reject; sp=maybe")
    )
    res = resolver(dns_server)
    r = await evaluate_dmarc("example.test", SPF_NONE, [], res, rng=never_sampled)
    assert (r.result, r.action, r.details["disposition"]) == ("fail", Action.NONE, "none")
    assert any("treated as p=none" in p for p in r.details["problems"])
    r = await evaluate_dmarc("norua.example.test", SPF_NONE, [], res)
    assert (r.result, r.action) == ("permerror", Action.NONE)
    assert "invalid p='bogus'" in r.reason
    r = await evaluate_dmarc("badsp.example.test", SPF_NONE, [], res)  # §6.6.3 step 5 covers a bad sp too
    assert (r.result, r.action) == ("permerror", Action.NONE)


async def test_details_hold_what_an_aggregate_report_needs(dns_server: DnsServer) -> None:
    dns_server.add(
        SOA
        + txt(
            "_dmarc.example.test",
            "v=DMARC1; p=quarantine; sp=reject; pct=50; adkim=s; aspf=r; fo=1:d; rf=afrf; ri=3600; "
            "rua=mailto:agg@example.test!10m,mailto:other@example.net; ruf=mailto:forensic@example.test; x-new=1",
        )
    )
    r = await evaluate_dmarc(
        "example.test",
        SpfIdentity("pass", "bounce.example.test"),
        [DkimIdentity("pass", "other.test", "sel"), DkimIdentity("fail", "example.test", "old")],
        resolver(dns_server),
        rng=lambda: 0.9,
    )
    assert r.result == "pass"
    d = r.details
    assert d["header_from"] == "example.test" and d["org_domain"] == "example.test"
    assert d["policy_published"] == {
        "domain": "example.test",
        "p": "quarantine",
        "sp": "reject",
        "pct": 50,
        "adkim": "s",
        "aspf": "r",
        "fo": "1:d",
        "rf": "afrf",
        "ri": 3600,
    }
    assert d["rua"] == ["mailto:agg@example.test", "mailto:other@example.net"]
    assert d["report_uris"]["rua"][0] == {"uri": "mailto:agg@example.test", "max_size": 10 * 2**20}
    assert d["ruf"] == ["mailto:forensic@example.test"]
    assert d["disposition"] == "none" and d["dkim_aligned"] == "fail" and d["spf_aligned"] == "pass"
    assert [(x["domain"], x["selector"], x["result"], x["aligned"]) for x in d["dkim"]] == [
        ("other.test", "sel", "pass", False),
        ("example.test", "old", "fail", False),
    ]
    assert d["record"].startswith("v=DMARC1; p=quarantine")
    assert r.dns_lookups == 1 and r.elapsed >= 0


# ---- the record -----------------------------------------------------------------------


def test_record_parsing_defaults_and_bad_optional_tags() -> None:
    rec = parse_dmarc_record("v=DMARC1;p=REJECT")
    assert rec is not None
    assert (rec.p, rec.sp, rec.pct, rec.adkim, rec.aspf, rec.fo, rec.rf, rec.ri) == (
        "reject",
        None,
        100,
        "r",
        "r",
        ("0",),
        ("afrf",),
        86400,
    )
    rec = parse_dmarc_record(
        "v = DMARC1 ; P = quarantine ; pct=101; adkim=x; aspf=S; rua=notauri, mailto:a@b.test!5k; fo=2; ri=-1; zz=1;"
    )
    assert rec is not None
    assert (rec.p, rec.pct, rec.adkim, rec.aspf, rec.fo, rec.ri) == ("quarantine", 100, "r", "s", ("0",), 86400)
    assert [(u.uri, u.max_size) for u in rec.rua] == [("mailto:a@b.test", 5 * 1024)]
    assert len(rec.problems) == 5
    assert parse_dmarc_record("v=spf1 -all") is None
    assert parse_dmarc_record("p=reject; v=DMARC1") is None
    assert parse_dmarc_record("v=DMARC1x; p=reject") is None


async def test_a_from_domain_that_is_not_a_domain_is_permerror_and_stays_out_of_the_header(
    dns_server: DnsServer,
) -> None:
    r = await evaluate_dmarc("evil.test\r\nX-Injected: 1", SPF_NONE, [], resolver(dns_server))
    assert (r.result, r.action) == ("permerror", Action.NONE)
    assert r.auth_results == ("dmarc=permerror (p=none dis=none)",)
    assert dns_server.queries == []
