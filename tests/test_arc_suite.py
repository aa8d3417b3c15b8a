"""The ARC conformance suite (draft-ietf-dmarc-arc-protocol test vectors, in tests/data/arc/).

Validation: every scenario's keys are served by the real DNS fixture and each
test message goes through `evaluate_arc` and a real `Resolver`.
Signing: `arc_seal` must reproduce the suite's ARC sets byte for byte in their
signed content, which means identical b= and bh= values.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from dkim.util import parse_tag_value
from dnslib import QTYPE, RR, TXT

from mailwarden.checks.arc import ArcSealRefused, arc_seal, evaluate_arc
from mailwarden.dns.resolver import Resolver
from tests.conftest import DnsServer

DATA = Path(__file__).parent / "data" / "arc"

# Where the suite and we part ways, with the reason. Empty when all of it passes.
XFAIL: dict[str, str] = {}


def _load(name: str) -> list[dict[str, Any]]:
    with open(DATA / name, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _cases(name: str) -> list[Any]:
    cases = []
    for scenario in _load(name):
        label = scenario["description"].strip().lower().replace(" ", "_")
        for test_name, test in scenario["tests"].items():
            case_id = f"{label}/{test_name}"
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL[case_id])] if case_id in XFAIL else []
            cases.append(pytest.param(scenario["txt-records"], test, id=case_id, marks=marks))
    return cases


def publish(dns_server: DnsServer, records: dict[str, str]) -> None:
    """TXT records as the suite gives them; over 255 bytes they become several character-strings of one record."""
    for name, text in records.items():
        data = text.strip().encode("utf-8")
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        dns_server.records.append(RR(name + ".", QTYPE.TXT, rdata=TXT(chunks), ttl=300))


def expected_cv(raw: Any) -> str:
    # A blank cv marks a chain some sealer already declared failed (cv=fail in an ARC-Seal):
    # RFC 8617 §5.2 step 2 makes that a "fail" for the validator, which is what we report.
    text = str(raw or "").strip().lower()
    return text or "fail"


@pytest.mark.parametrize(("records", "test"), _cases("arc-draft-validation-tests.yml"))
async def test_validation(dns_server: DnsServer, records: dict[str, str], test: dict[str, Any]) -> None:
    publish(dns_server, records)
    result = await evaluate_arc(test["message"].encode("utf-8"), Resolver([dns_server.address], timeout=2.0))
    assert result.details["cv"] == expected_cv(test["cv"]), result.reason


def _sign_cases() -> list[Any]:
    cases = []
    for scenario in _load("arc-draft-sign-tests.yml"):
        label = scenario["description"].strip().lower().replace(" ", "_")
        for test_name, test in scenario["tests"].items():
            cases.append(pytest.param(scenario, test, id=f"{label}/{test_name}"))
    return cases


def _tags(value: str) -> dict[bytes, bytes]:
    tags = parse_tag_value(" ".join(value.split()).encode("ascii"))
    return {k: b"".join(v.split()) for k, v in tags.items()}


def _relaxed(value: str) -> str:
    return " ".join(value.split())  # relaxed header canonicalization (RFC 6376 §3.4.2) of a value


def _field(message: bytes, name: bytes) -> str:
    lines = message.split(b"\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + b":"):
            value = line[len(name) + 1 :]
            for more in lines[i + 1 :]:
                if more[:1] not in (b" ", b"\t"):
                    break
                value += b"\r\n" + more
            return value.decode("utf-8")
    raise AssertionError(f"no {name!r} in the sealed message")


def _authentication_results(message: str, srv_id: str) -> str:
    """The resinfo of every Authentication-Results from `srv_id`, merged, as the pipeline would hand it over."""
    header = message.split("\n\n", 1)[0]
    fields = [f for f in header.replace("\n ", " ").replace("\n\t", " ").split("\n") if f]
    found = []
    for f in fields:
        name, _, value = f.partition(":")
        if name.strip().lower() == "authentication-results" and value.strip().startswith(srv_id + ";"):
            found.append(value.strip()[len(srv_id) + 1 :].strip().rstrip(";"))
    return "; ".join(found)


@pytest.mark.parametrize(("scenario", "test"), _sign_cases())
def test_signing(scenario: dict[str, Any], test: dict[str, Any]) -> None:
    message = test["message"].replace("\n", "\r\n").encode("utf-8")
    seal = functools.partial(
        arc_seal,
        message,
        _authentication_results(test["message"], test["srv-id"]),
        domain=scenario["domain"],
        selector=scenario["sel"],
        private_key_pem=scenario["privatekey"].encode("ascii"),
        srv_id=test["srv-id"],
        sign_headers=test["sig-headers"].split(":"),
        timestamp=int(test["t"]),
    )
    if not str(test["AAR"] or "").strip():  # the suite expects no new set
        with pytest.raises(ArcSealRefused):
            seal()
        return
    sealed = seal()
    assert sealed.endswith(message)
    assert _relaxed(_field(sealed, b"ARC-Authentication-Results")) == _relaxed(test["AAR"])
    assert _tags(_field(sealed, b"ARC-Message-Signature")) == _tags(test["AMS"])
    assert _tags(_field(sealed, b"ARC-Seal")) == _tags(test["AS"])
