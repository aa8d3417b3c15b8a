"""Milters over real SMTP: a small filter speaking the real protocol (tests/milter_peer.py) decides.

Stages, no-reply flags, macros, every modification, the order of several
filters, failure modes and directions, as an SMTP client sees them.
The real filters (rspamd, spamass-milter, clamav-milter) are in
tests/test_milter_peers.py.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwarden.protocol import milter as m
from tests.conftest import ALICE, ALICE_PW, BOB, DnsServer, RunningServer, run_cli
from tests.milter_peer import DROP, HANG, PeerMilter

SENDER = "someone@sender.test"


@pytest.fixture
def peers() -> Iterator[list[PeerMilter]]:
    made: list[PeerMilter] = []
    yield made
    for p in made:
        p.close()


def peer(peers: list[PeerMilter], *args: Any, **kwargs: Any) -> PeerMilter:
    p = PeerMilter(*args, **kwargs)
    peers.append(p)
    return p


def spec(p: PeerMilter | str, name: str = "peer", **extra: Any) -> dict[str, Any]:
    address = p if isinstance(p, str) else p.address
    return {"name": name, "address": address, "timeout": 5, "eom_timeout": 5, **extra}


def message(subject: str = "hello", body: str = "the original body") -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{time.monotonic_ns()}@sender.test>\r\n\r\n{body}\r\n"
    ).encode()


def send(rs: RunningServer, rcpts: list[str], data: bytes, sender: str = SENDER) -> tuple[int, bytes, dict[str, Any]]:
    """(DATA reply code, text, refused recipients) for one message to the MX."""
    with smtplib.SMTP("127.0.0.1", rs.ports["mx"], timeout=30) as c:
        c.ehlo("client.sender.test")
        assert c.mail(sender)[0] == 250
        refused = {}
        for r in rcpts:
            code, text = c.rcpt(r)
            if code != 250:
                refused[r] = (code, text)
        if len(refused) == len(rcpts):
            return 0, b"", refused
        code, text = c.data(data)
        return code, text, refused


def test_modifications_and_macros(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    def script(command: bytes, data: bytes) -> Any:
        if command == m.BODYEOB:
            return [
                m.HeaderChange(m.ADDHEADER, 0, "X-Filtered", "yes"),
                m.HeaderChange(m.CHGHEADER, 1, "Subject", "changed by the filter"),
                m.HeaderChange(m.INSHEADER, 0, "X-First", "top"),
                m.HeaderChange(m.CHGHEADER, 1, "Date", ""),  # an empty value deletes
                m.BodyReplacement(m.REPLBODY, b"replaced "),
                m.BodyReplacement(m.REPLBODY, b"body\nwith a bare LF\r\n"),
                m.Recipient(m.ADDRCPT, f"<{BOB}>"),
                m.Recipient(m.DELRCPT, f"<{ALICE}>"),
                m.Reply(m.CONTINUE),
            ]
        return None

    p = peer(peers, script)
    rs = server_factory({"milter.milters": [spec(p)]})
    code, text, _ = send(rs, [ALICE], message("original subject"))
    assert code == 250, text
    qid = text.decode().rsplit(" ", 1)[1]
    assert rs.inbox(ALICE) == []  # removed by the filter
    (row,) = rs.inbox(BOB)  # added by the filter
    assert row[3] == "changed by the filter"
    stored = rs.message(BOB, int(row[0]))
    head, _, body = stored.partition(b"\r\n\r\n")
    assert body == b"replaced body\r\nwith a bare LF\r\n"
    assert b"\r\nX-Filtered: yes" in head and b"\r\nDate:" not in head
    assert head.index(b"X-First: top") < head.index(b"From: ")
    # What the filter was told, stage by stage.
    macros = p.macros()
    assert macros["{client_addr}"] == "127.0.0.1"
    assert macros["j"] == "mail.example.test"
    assert macros["{daemon_name}"] == "mx"
    assert macros["i"] == qid  # the queue id the client is told in the 250 reply
    assert macros["{mail_addr}"] == SENDER and macros["{rcpt_addr}"] == ALICE
    assert p.commands(m.HELO) == [b"client.sender.test\x00"]
    assert p.commands(m.MAIL) == [f"<{SENDER}>\x00".encode()]
    assert ("Subject", "original subject") in p.headers()
    assert b"".join(p.commands(m.BODY)) == b"the original body\r\n"


def test_a_recipient_refusal_refuses_only_that_recipient(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    def script(command: bytes, data: bytes) -> Any:
        if command == m.RCPT and BOB.encode() in data:
            return [m.ReplyCode(m.REPLYCODE, 550, "5.7.1", "bob takes no mail from you")]
        return None

    rs = server_factory({"milter.milters": [spec(peer(peers, script))]})
    code, _, refused = send(rs, [ALICE, BOB], message())
    assert code == 250
    assert refused == {BOB: (550, b"5.7.1 bob takes no mail from you")}
    assert len(rs.inbox(ALICE)) == 1 and rs.inbox(BOB) == []


def test_no_reply_and_skip_flags_are_honoured(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    """A filter that asked not to answer steps gets no wait on them (else we would hang until the timeout)."""
    nr = m.P_NR_CONN | m.P_NR_MAIL | m.P_NR_RCPT | m.P_NR_DATA | m.P_NR_HDR | m.P_NR_EOH | m.P_NR_BODY
    p = peer(
        peers,
        protocol=nr | m.P_NOHELO | m.P_HDR_LEADSPC,
        symlists={m.STAGE_CONNECT: ("{client_addr}",), m.STAGE_ENVFROM: ("{mail_addr}",)},
    )
    rs = server_factory({"milter.milters": [spec(p, timeout=20, eom_timeout=20)]})
    started = time.monotonic()
    code, text, _ = send(rs, [ALICE], message("leading space kept"))
    assert code == 250, text
    assert time.monotonic() - started < 10  # no step waited for its 20 s timeout
    assert len(rs.inbox(ALICE)) == 1
    assert p.commands(m.HELO) == []  # SMFIP_NOHELO
    assert ("Subject", " leading space kept") in p.headers()  # SMFIP_HDR_LEADSPC
    connect_macros = [d for d in p.commands(m.MACRO) if d[:1] == m.CONNECT]
    assert connect_macros == [b"C{client_addr}\x00127.0.0.1\x00"]  # only what SETSYMLIST asked for
    assert len(p.commands(m.BODYEOB)) == 1


@pytest.mark.parametrize("behaviour", [HANG, DROP])
@pytest.mark.parametrize("mode", ["tempfail", "accept"])
def test_failure_modes(server_factory, peers: list[PeerMilter], behaviour: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    p = peer(peers, lambda command, data: behaviour if command == m.BODYEOB else None)
    rs = server_factory({"milter.milters": [spec(p, failure_mode=mode, eom_timeout=1)]})
    code, text, _ = send(rs, [ALICE], message())
    if mode == "tempfail":
        assert (code, text) == (451, b"4.7.1 Content filter peer unavailable, try again later")
        assert rs.inbox(ALICE) == []
    else:
        assert code == 250, text
        assert len(rs.inbox(ALICE)) == 1


def test_a_filter_that_cannot_be_reached_tempfails_at_mail(server_factory) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"inet:127.0.0.1:{s.getsockname()[1]}"
    rs = server_factory({"milter.milters": [spec(closed, name="gone")]})
    with smtplib.SMTP("127.0.0.1", rs.ports["mx"], timeout=30) as c:
        c.ehlo("client.sender.test")
        assert c.mail(SENDER) == (451, b"4.7.1 Content filter gone unavailable, try again later")


def test_several_filters_run_in_order(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    def first(command: bytes, data: bytes) -> Any:
        return (
            [m.HeaderChange(m.ADDHEADER, 0, "X-Order", "first"), m.Reply(m.CONTINUE)] if command == m.BODYEOB else None
        )

    def second(command: bytes, data: bytes) -> Any:
        if command == m.HEADER and data.startswith(b"Subject\x00") and b"reject me" in data:
            return [m.ReplyCode(m.REPLYCODE, 554, "5.7.1", "second says no")]
        return (
            [m.HeaderChange(m.ADDHEADER, 0, "X-Order", "second"), m.Reply(m.ACCEPT)] if command == m.BODYEOB else None
        )

    a, b, c = peer(peers, first), peer(peers, second), peer(peers)
    rs = server_factory({"milter.milters": [spec(a, "a"), spec(b, "b"), spec(c, "c")]})
    code, _, _ = send(rs, [ALICE], message())
    assert code == 250
    (row,) = rs.inbox(ALICE)
    head = rs.message(ALICE, int(row[0])).partition(b"\r\n\r\n")[0]
    assert head.index(b"X-Order: first") < head.index(b"X-Order: second")
    assert ("X-Order", "first") in b.headers()  # the second filter saw the first one's change
    assert ("X-Order", "first") in c.headers() and ("X-Order", "second") in c.headers()
    code, text, _ = send(rs, [ALICE], message("reject me"))
    assert (code, text) == (554, b"5.7.1 second says no")
    assert len(c.commands(m.BODYEOB)) == 1  # the third filter never saw the refused message
    assert len(rs.inbox(ALICE)) == 1


def test_discard_and_quarantine_are_kept_for_review(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    subjects: list[bytes] = []

    def script(command: bytes, data: bytes) -> Any:
        if command == m.HEADER and data.startswith(b"Subject\x00"):
            subjects.append(data)
        if command != m.BODYEOB:
            return None
        if b"discard" in subjects[-1]:
            return [m.Reply(m.DISCARD)]
        if b"quarantine" in subjects[-1]:
            return [m.Quarantine(m.QUARANTINE, "suspicious"), m.Reply(m.CONTINUE)]
        return None

    rs = server_factory({"milter.milters": [spec(peer(peers, script))]})
    for subject in ("discard this", "quarantine this", "fine"):
        assert send(rs, [ALICE], message(subject))[0] == 250
    assert [r[3] for r in rs.inbox(ALICE)] == ["fine"]
    assert rs.inbox(ALICE, "Junk") == []
    # Action.QUARANTINE: held in the quarantine for an administrator, in no mailbox.
    code, out, err = rs.cli("quarantine", "list")
    assert code == 0, err
    held = [line.split("\t") for line in out.splitlines()[1:]]
    assert sorted(row[5] for row in held) == ["discard this", "quarantine this"]


def test_direction_outbound_filters_only_authenticated_mail(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    def script(command: bytes, data: bytes) -> Any:
        return [m.ReplyCode(m.REPLYCODE, 550, "5.7.1", "outbound filter says no")] if command == m.MAIL else None

    p = peer(peers, script)
    rs = server_factory({"milter.milters": [spec(p, direction="outbound")]})
    assert send(rs, [ALICE], message())[0] == 250  # inbound: not consulted
    assert p.connections == 0
    with smtplib.SMTP("127.0.0.1", rs.ports["submission"], timeout=30) as c:
        c.ehlo("laptop")
        c.starttls(context=rs.tls.client_context())
        c.ehlo("laptop")
        c.login(ALICE, ALICE_PW)
        assert c.mail(ALICE) == (550, b"5.7.1 outbound filter says no")
    macros = p.macros()
    assert macros["{auth_authen}"] == ALICE and macros["{daemon_name}"] == "submission"


def test_results_join_the_inbound_verdict_and_inspect(  # type: ignore[no-untyped-def]
    server_factory, peers: list[PeerMilter], dns_server: DnsServer, tmp_path
) -> None:
    """For untrusted clients the filters' results merge with SPF/DKIM/DMARC; the filter's reply text wins."""

    def script(command: bytes, data: bytes) -> Any:
        if command == m.BODYEOB:
            return [m.ReplyCode(m.REPLYCODE, 550, "5.7.1", "Virus found: Test-Sig")]
        return None

    p = peer(peers, script)
    rs = server_factory({"milter.milters": [spec(p, "scanner")], "inbound.trusted_networks": []})
    code, text, _ = send(rs, [ALICE], message())
    assert (code, text) == (550, b"5.7.1 Virus found: Test-Sig")
    path = tmp_path / "msg.eml"
    path.write_bytes(message())
    code, out, err = run_cli("--dir", rs.dir, "inspect", str(path), "--ip", "192.0.2.7", "--mail-from", SENDER)
    assert code == 0, err
    assert "Verdict: reject" in out and "550 5.7.1 Virus found: Test-Sig" in out
    assert re.search(r"milter:scanner\s+reject", out)
    assert p.macros()["{client_addr}"] == "192.0.2.7"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "x"}, "expected inet:HOST:PORT"),
        ({"name": "x", "address": "inet:127.0.0.1:0"}, "port 1-65535"),
        ({"name": "x", "address": "tcp:127.0.0.1:25"}, "unknown kind"),
        ({"name": "x", "address": "unix:/run/f.sock", "failure_mode": "reject"}, "failure_mode"),
        ({"name": "x", "address": "unix:/run/f.sock", "direction": "sideways"}, "direction"),
        ({"name": "x", "address": "unix:/run/f.sock", "timeout": 0}, "more than 0"),
        ({"name": "x", "address": "unix:/run/f.sock", "colour": "red"}, "unknown key"),
        ({"name": "bad name", "address": "unix:/run/f.sock"}, "name must be"),
    ],
)
def test_config_refuses_bad_milter_entries(entry: dict[str, Any], problem: str) -> None:
    from mailwarden import config

    with pytest.raises(config.ConfigError, match=problem):
        config.validate({"milter": {"milters": [entry]}}, Path("."))


def test_config_accepts_every_address_form() -> None:
    from mailwarden.checks.milter import parse_specs

    specs = parse_specs(
        [
            {"name": "a", "address": "inet:127.0.0.1:11332"},
            {"name": "b", "address": "inet:8890@127.0.0.1", "failure_mode": "accept", "direction": "both"},
            {"name": "c", "address": "inet6:[::1]:8891", "timeout": 2, "eom_timeout": 30},
            {"name": "d", "address": "unix:/run/clamav/clamav-milter.ctl"},
        ]
    )
    assert [s.name for s in specs] == ["a", "b", "c", "d"]
    assert specs[1].applies("outbound") and specs[1].applies("inbound") and not specs[0].applies("outbound")
    assert specs[2].timeout == 2.0 and specs[2].eom_timeout == 30.0


def test_a_filter_on_a_unix_socket_asking_for_flags_we_did_not_offer(
    server_factory, peers: list[PeerMilter], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    def script(command: bytes, data: bytes) -> Any:
        return (
            [m.HeaderChange(m.ADDHEADER, 0, "X-Scanned", "unix"), m.Reply(m.CONTINUE)] if command == m.BODYEOB else None
        )

    # SMFIP_RCPT_REJ was not offered: the filter simply does not get refused recipients.
    p = peer(peers, script, protocol=m.P_RCPT_REJ, unix_path=str(tmp_path / "filter.sock"))
    rs = server_factory({"milter.milters": [spec(p)]})
    assert send(rs, [ALICE], message())[0] == 250
    (row,) = rs.inbox(ALICE)
    assert b"\r\nX-Scanned: unix\r\n" in rs.message(ALICE, int(row[0]))


def test_outbound_spam_verdict_holds_remote_mail(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    def script(command: bytes, data: bytes) -> Any:
        return (
            [m.HeaderChange(m.ADDHEADER, 0, "X-Spam-Flag", "YES"), m.Reply(m.CONTINUE)]
            if command == m.BODYEOB
            else None
        )

    p = peer(peers, script)
    rs = server_factory({"milter.milters": [spec(p, direction="both")]})
    with smtplib.SMTP("127.0.0.1", rs.ports["submission"], timeout=30) as c:
        c.ehlo("laptop")
        c.starttls(context=rs.tls.client_context())
        c.ehlo("laptop")
        c.login(ALICE, ALICE_PW)
        body = f"From: {ALICE}\r\nTo: friend@remote.test\r\nSubject: buy now\r\n\r\ncheap pills\r\n"
        assert c.sendmail(ALICE, ["friend@remote.test"], body) == {}
    rs.wait_filed()
    code, out, err = rs.cli("queue", "list")
    assert code == 0, err
    (row,) = out.splitlines()[1:]
    assert row.split("\t")[2] == "held"  # never sent: the filter called it spam


def test_a_nul_in_a_header_reaches_the_filter_as_a_space(server_factory, peers: list[PeerMilter]) -> None:  # type: ignore[no-untyped-def]
    p = peer(peers)
    rs = server_factory({"milter.milters": [spec(p)]})
    code, text, _ = send(rs, [ALICE], message().replace(b"Subject: hello", b"Subject: hel\x00lo"))
    assert code == 250, text
    assert ("Subject", "hel lo") in p.headers()
    assert len(rs.inbox(ALICE)) == 1
