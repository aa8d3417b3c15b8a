"""Compromised-account hold: each signal triggers at its threshold, the admin is told, and unhold releases."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from mailwarden.outbound.compromise import CompromiseGuard, HoldPolicy, decide
from mailwarden.storage.interfaces import Activity
from mailwarden.storage.sql import SqlStore
from tests.conftest import ALICE, ALICE_PW, BOB, DnsServer, RunningServer
from tests.test_queue_runner import peer, relaying  # noqa: F401 - fixtures

HIGH_QUOTAS = {"quotas.user_recipients_per_hour": 10_000, "quotas.user_recipients_per_day": 10_000}


def login(server: RunningServer, source: str = "127.0.0.1") -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30, source_address=(source, 0))
    c.ehlo("laptop")
    c.starttls(context=server.tls.client_context())
    c.ehlo("laptop")
    c.login(ALICE, ALICE_PW)
    return c


def send(c: smtplib.SMTP, rcpts: list[str], subject: str = "hello") -> None:
    body = f"From: {ALICE}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    assert c.sendmail(ALICE, rcpts, body) == {}


def statuses(server: RunningServer) -> dict[str, str]:
    server.wait_filed()
    return {e.recipient: e.status for e in server.call(server.server.store.list_queue())}


def with_postmaster(server: RunningServer) -> RunningServer:
    code, _, err = server.cli("alias", "add", "postmaster@example.test", BOB)
    assert code == 0, err
    return server


def test_recipient_burst_holds_the_message_that_crosses_and_unhold_releases(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = with_postmaster(server_factory({**HIGH_QUOTAS, "hold.unique_recipients_per_hour": 3}))
    with login(server) as c:
        send(c, ["a@far.test", "b@far.test"])
        send(c, ["a@far.test", "c@far.test"])  # 3 unique: at the threshold, not past it
        assert set(statuses(server).values()) == {"queued"}
        send(c, ["d@far.test"])  # the 4th unique recipient: held, and so is what follows
        send(c, ["e@far.test"], "second")
        send(c, [BOB], "to a colleague")  # local mail does not leave the server: never held
    found = statuses(server)
    assert found["d@far.test"] == "held" and found["e@far.test"] == "held"
    assert found["a@far.test"] == found["c@far.test"] == "queued"
    assert "to a colleague" in [r[3] for r in server.inbox(BOB)]
    alerts = [r[3] for r in server.inbox(BOB) if r[3].startswith("Account on hold")]
    assert alerts == [f"Account on hold: {ALICE} (recipient_burst)"]  # one alert per hold

    code, out, err = server.cli("user", "unhold", ALICE)
    assert code == 0, err
    assert "2 held recipient(s) released" in out
    assert set(statuses(server).values()) == {"queued"}
    code, _, err = server.cli("user", "unhold", ALICE)
    assert code != 0 and "not on hold" in err


def test_new_ip_login_followed_by_a_burst_is_held(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = with_postmaster(
        server_factory({**HIGH_QUOTAS, "hold.new_ip_recipients": 2, "hold.unique_recipients_per_hour": 0})
    )
    with login(server) as c:  # the account's first login: its usual address
        send(c, ["a@far.test", "b@far.test", "c@far.test"])
    assert set(statuses(server).values()) == {"queued"}
    with login(server, source="127.0.0.2") as c:  # an address this account never used
        send(c, ["x@far.test", "y@far.test"])  # 2 since the login: at the threshold
        send(c, ["z@far.test"])
    found = statuses(server)
    assert (found["x@far.test"], found["z@far.test"]) == ("queued", "held")
    alerts = [r[3] for r in server.inbox(BOB) if r[3].startswith("Account on hold")]
    assert alerts == [f"Account on hold: {ALICE} (new_ip_burst)"]


def test_bounce_rate_signal_counts_only_past_its_sample(tmp_path: Path) -> None:
    async def go() -> tuple[object, object]:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        guard = CompromiseGuard(HoldPolicy(unique_recipients_per_hour=0, min_bounce_sample=10, bounce_rate=0.3), store)
        now = 1_800_000_000.0
        for i in range(9):  # 6 of 9 failed, but 9 is below the sample size
            await store.note_delivery(ALICE, failed=i < 6, now=now)
        before = await guard.after_accept(ALICE, [], now=now)
        await store.note_delivery(ALICE, failed=False, now=now)  # 6 of 10: 60 % > 30 %
        after = await guard.after_accept(ALICE, [], now=now)
        held = await store.account_hold(ALICE)
        await store.close()
        return before, (after, held)

    before, (after, held) = asyncio.run(go())
    assert before is None
    assert after is not None and after.signal == "bounce_rate" and "6 of 10" in after.reason
    assert held == after.reason


def test_decisions_name_their_numbers() -> None:
    policy = HoldPolicy(unique_recipients_per_hour=100, min_bounce_sample=20, bounce_rate=0.3, new_ip_recipients=30)
    assert decide(Activity(100, 0, 0, None, 0), policy) is None
    burst = decide(Activity(101, 0, 0, None, 0), policy)
    assert burst is not None and burst.reason.startswith("101 unique outside recipients")
    assert decide(Activity(5, 20, 6, None, 0), policy) is None  # exactly 30 %: not past it
    assert decide(Activity(5, 0, 0, "192.0.2.9", 30), policy) is None
    new_ip = decide(Activity(31, 0, 0, "192.0.2.9", 31), policy)
    assert new_ip is not None and new_ip.signal == "new_ip_burst" and "192.0.2.9" in new_ip.reason


def test_spam_from_an_authenticated_user_is_held_with_an_alert(server_factory, dns_server: DnsServer) -> None:  # type: ignore[no-untyped-def]
    # The same content stage inbound mail gets: here, the URI block list knows the linked domain.
    dns_server.add(
        "bl.test. 300 IN SOA ns.bl.test. admin.bl.test. 1 3600 600 86400 0\n"
        "test.dbl.bl.test. 300 IN A 127.0.1.2\n"
        "spammy.example.dbl.bl.test. 300 IN A 127.0.1.2\n"
    )
    server = with_postmaster(
        server_factory({**HIGH_QUOTAS, "dnsbl.zones": [{"preset": "spamhaus-dbl", "name": "dbl.bl.test"}]})
    )
    with login(server) as c:
        send(c, ["clean@far.test"], "lunch?")
        body = f"From: {ALICE}\r\nTo: x@far.test\r\nSubject: offer\r\n\r\nBuy now https://www.spammy.example/x\r\n"
        assert c.sendmail(ALICE, ["x@far.test"], body.encode()) == {}
    found = statuses(server)
    assert found["x@far.test"] == "held"
    assert found.get("clean@far.test") != "held"
    entry = next(e for e in server.call(server.server.store.list_queue()) if e.recipient == "x@far.test")
    assert "uribl=listed" in entry.last_error and "spammy.example" in entry.last_error
    alerts = [r[3] for r in server.inbox(BOB) if r[3].startswith("Message held")]
    assert alerts == [f"Message held: {ALICE} (outbound_content)"]


def test_bounces_reported_by_the_queue_runner_put_the_account_on_hold(relaying) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    r = relaying(
        **HIGH_QUOTAS,
        **{"hold.min_bounce_sample": 3, "hold.bounce_rate": 0.3, "hold.unique_recipients_per_hour": 0},
    )
    dead = ["x1@far.test", "x2@far.test", "x3@far.test"]
    for address in dead:
        r.peer.rcpt_replies[address] = ["550 5.1.1 No such user"]
    r.send(dead, "list mailing")
    r.run_queue()  # three permanent failures: 100 % of 3 attempts
    assert r.queue() == []
    r.send(["y@far.test"], "next")
    assert [(e.recipient, e.status) for e in r.queue()] == [("y@far.test", "held")]
    assert "3 of 3 deliveries failed" in r.queue()[0].last_error
