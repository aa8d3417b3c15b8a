"""The connection guard end to end: real servers, real SMTP clients bound to 127.0.0.x source addresses."""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage
from typing import Any

import pytest

from tests.conftest import ALICE, ALICE_PW, BOB, RunningServer, make_instance, spawn_serve, wait_until

EVENTS = ("auth_fail", "unknown_user", "relay", "protocol", "early_talker", "scanner")
BAN_LINE = re.compile(
    r"event=ban ip=(\S+) scope=ip reason=(\w+) events=(\d+) duration=(\d+) until=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
)


def guard_config(**thresholds: int) -> dict[str, Any]:
    """Low limits for these tests; thresholds not named stay out of reach."""
    limits = {e: 1000 for e in EVENTS}
    limits.update(thresholds)
    return {"guard.ip_thresholds": limits, "guard.sync_interval": 0.1}


class Refused(Exception):
    def __init__(self, code: int, text: bytes) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text


def submissions(server: Any, source: str, timeout: float = 10) -> smtplib.SMTP_SSL:
    """An implicit-TLS submission client from `source`; Refused if the greeting is not 220."""
    ctx = server.tls.client_context() if hasattr(server, "tls") else _insecure()
    try:
        return smtplib.SMTP_SSL(
            "127.0.0.1", server.ports["submissions"], context=ctx, timeout=timeout, source_address=(source, 0)
        )
    except smtplib.SMTPConnectError as exc:
        raise Refused(exc.smtp_code, exc.smtp_error) from None


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def auth(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN exchange: the server's reply code and text, whatever it is."""
    client.ehlo("client.example")
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {blob}")


def failed_login(server: Any, source: str, user: str, password: str) -> tuple[int, bytes]:
    with submissions(server, source) as client:
        return auth(client, user, password)


def greeting(port: int, source: str, timeout: float = 10) -> tuple[int, bytes]:
    """Connect from `source` and read the first reply line (220 or a refusal)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data[:3] or b"0"), data[4:].split(b"\r\n")[0]


def bans_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, ...]]:
    return [m.groups() for r in caplog.records if (m := BAN_LINE.search(r.getMessage()))]


# ---- automatic bans -----------------------------------------------------------


def test_one_ip_many_users_is_banned(server_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    server = server_factory(guard_config(auth_fail=3))
    replies = [failed_login(server, "127.0.0.2", f"user{i}@example.test", f"guess {i}") for i in range(3)]
    assert [code for code, _ in replies[:2]] == [535, 535]
    assert replies[2][0] == 421 and b"banned" in replies[2][1]  # the third failure ends the session at once
    with pytest.raises(Refused) as refused:
        submissions(server, "127.0.0.2")
    assert refused.value.code == 421 and b"4.7.0" in refused.value.text and b"banned" in refused.value.text
    assert greeting(server.ports["mx"], "127.0.0.2")[0] == 421  # a ban covers every listener
    assert greeting(server.ports["mx"], "127.0.0.3")[0] == 220  # and only that address
    assert bans_logged(caplog) == [("127.0.0.2", "auth_fail", "3", "600")]
    fails = [r.getMessage() for r in caplog.records if "event=auth_fail" in r.getMessage()]
    assert len(fails) == 3 and all(
        re.search(r"proto=smtp ip=127\.0\.0\.2 user=user\d@example\.test$", f) for f in fails
    )
    code, out, _ = server.cli("ban", "list")
    assert code == 0 and re.search(r"^127\.0\.0\.2\t\d{4}-\S+Z\tauth_fail\t3$", out, re.M)


def test_many_ips_one_user_is_throttled_but_owner_logs_in(
    server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    server = server_factory(
        guard_config(auth_fail=3)
        | {"guard.account_threshold": 2, "guard.throttle_delay": 0.3, "guard.throttle_max": 5.0}
    )
    took = []
    for i in range(5):  # a spray: one guess per IP, never enough for an IP ban
        with submissions(server, f"127.0.1.{i + 1}") as client:
            client.ehlo("x")
            started = time.monotonic()
            code, _ = auth(client, ALICE, f"spray guess {i}")
            took.append(time.monotonic() - started)
            assert code == 535
    assert took[0] < 0.3 and took[1] < 0.3
    assert 0.3 <= took[2] < took[3] < took[4]  # 0.3, 0.6, 1.2 s: the delay grows with each failure
    assert took[4] >= 1.2
    with submissions(server, "127.0.1.50") as owner:  # the owner, from an address with no failures
        started = time.monotonic()
        code, _ = auth(owner, ALICE, ALICE_PW)
        elapsed = time.monotonic() - started
    assert code == 235 and elapsed < 0.3  # logged in, not delayed, not locked out
    throttles = [r.getMessage() for r in caplog.records if "event=throttle" in r.getMessage()]
    assert throttles[-1].endswith(f"event=throttle user={ALICE} failures=5 delay=1.2")
    assert bans_logged(caplog) == []


def test_same_wrong_password_repeated_counts_once(server_factory: Any) -> None:
    server = server_factory(guard_config(auth_fail=3))
    for _ in range(6):  # a phone with yesterday's password, retrying
        assert failed_login(server, "127.0.0.4", BOB, "yesterday's password")[0] == 535
    assert greeting(server.ports["mx"], "127.0.0.4")[0] == 220
    assert failed_login(server, "127.0.0.4", BOB, "another")[0] == 535
    assert failed_login(server, "127.0.0.4", BOB, "and another")[0] == 421  # three different ones: banned


def test_unknown_recipients_and_protocol_errors_ban(server_factory: Any) -> None:
    server = server_factory(guard_config(unknown_user=3, protocol=3))
    client = smtplib.SMTP("127.0.0.1", server.ports["mx"], source_address=("127.0.0.5", 0))
    client.ehlo("harvester.example")
    client.mail("probe@remote.test")
    codes = [client.rcpt(f"guess{i}@example.test")[0] for i in range(3)]
    client.close()
    assert codes == [550, 550, 421]
    assert greeting(server.ports["mx"], "127.0.0.5")[0] == 421
    client = smtplib.SMTP("127.0.0.1", server.ports["mx"], source_address=("127.0.0.6", 0))
    codes = [client.docmd(f"GARBAGE{i}")[0] for i in range(3)]
    codes.append(client.getreply()[0])  # the third error's reply is followed by the ban's 421
    client.close()
    assert codes == [502, 502, 502, 421]
    assert greeting(server.ports["mx"], "127.0.0.6")[0] == 421


def test_port_scanner_is_banned(server_factory: Any) -> None:
    server = server_factory(guard_config(scanner=3))
    for _ in range(3):  # connect, read nothing useful, hang up
        socket.create_connection(("127.0.0.1", server.ports["mx"]), source_address=("127.0.0.7", 0)).close()
    wait_until(lambda: greeting(server.ports["mx"], "127.0.0.7")[0] == 421)


# ---- allow and deny lists ---------------------------------------------------------


def test_allow_listed_ip_is_never_banned_and_wins_over_a_ban(server_factory: Any) -> None:
    server = server_factory(guard_config(auth_fail=2) | {"guard.allow": ["127.0.0.8/32"]})
    for i in range(6):
        assert failed_login(server, "127.0.0.8", f"u{i}@example.test", f"p{i}")[0] == 535
    assert greeting(server.ports["mx"], "127.0.0.8")[0] == 220
    for i in range(2):
        failed_login(server, "127.0.0.9", f"u{i}@example.test", f"p{i}")
    assert greeting(server.ports["mx"], "127.0.0.9")[0] == 421
    code, _, err = server.cli("allow", "add", "127.0.0.9")
    assert code == 0, err
    wait_until(lambda: greeting(server.ports["mx"], "127.0.0.9")[0] == 220)  # the allow list beats the ban in force
    code, out, _ = server.cli("allow", "list")
    assert out.splitlines() == ["127.0.0.8/32\tconfig", "127.0.0.9/32\tcli"]


def test_deny_list_refuses_per_listener(server_factory: Any) -> None:
    server = server_factory(guard_config() | {"guard.deny": ["mx:127.0.0.10/32"]})
    code, text = greeting(server.ports["mx"], "127.0.0.10")
    assert code == 554 and text.startswith(b"5.7.1")
    assert greeting(server.ports["submission"], "127.0.0.10")[0] == 220  # mx only
    assert greeting(server.ports["mx"], "127.0.0.11")[0] == 220
    assert server.cli("deny", "add", "127.0.0.11/32")[0] == 0
    wait_until(lambda: greeting(server.ports["mx"], "127.0.0.11")[0] == 554)
    assert server.cli("deny", "remove", "127.0.0.11")[0] == 0
    wait_until(lambda: greeting(server.ports["mx"], "127.0.0.11")[0] == 220)


# ---- CLI bans -------------------------------------------------------------------------


def test_cli_ban_and_unban_take_effect_on_a_running_server(server_factory: Any) -> None:
    server = server_factory(guard_config() | {"guard.sync_interval": 3600.0})  # no periodic reload: at once it is
    assert server.cli("ban", "add", "127.0.0.12", "--for", "1h")[0] == 0
    server.call(server.server.conn_guard.sync())  # a ban by another process is seen at the next sync
    assert greeting(server.ports["mx"], "127.0.0.12")[0] == 421
    code, out, err = server.cli("ban", "remove", "127.0.0.12")
    assert code == 0 and out.strip() == "unbanned 127.0.0.12", err
    assert greeting(server.ports["mx"], "127.0.0.12")[0] == 220  # the very next connection, no sync needed
    code, _, err = server.cli("ban", "remove", "127.0.0.12")
    assert code == 1 and "no ban in force" in err


def test_ban_outlives_a_restart(tmp_path: Any, tls: Any) -> None:
    paths = make_instance(
        tmp_path / "instance", tls, guard_config(auth_fail=3) | {"server.workers": 2, "guard.sync_interval": 0.2}
    )
    serve = spawn_serve(paths.root)
    try:
        replies = []
        for i in range(12):  # counters are per worker: keep guessing until one worker bans
            try:
                replies.append(failed_login(serve, "127.0.0.13", f"u{i}@example.test", f"p{i}")[0])
            except Refused as refused:
                replies.append(refused.code)
            if replies[-1] == 421:
                break
        assert replies[-1] == 421, replies
        serve.wait_for(("event=ban ip=127.0.0.13 scope=ip reason=auth_fail",))
    finally:
        assert serve.stop() == 0
    serve = spawn_serve(paths.root)
    try:
        for _ in range(6):  # whichever worker takes the connection refuses it
            assert greeting(serve.ports["mx"], "127.0.0.13")[0] == 421
        assert greeting(serve.ports["mx"], "127.0.0.14")[0] == 220
    finally:
        serve.stop()


# ---- connection and command limits -------------------------------------------------------


def test_connection_limits_per_ip(server_factory: Any) -> None:
    server = server_factory(guard_config() | {"guard.max_connections": 2, "guard.max_connections_per_minute": 4})
    port = server.ports["mx"]
    held = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.15", 0)) for _ in range(2)]
    for sock in held:
        assert sock.recv(100).startswith(b"220")
    code, text = greeting(port, "127.0.0.15")
    assert code == 421 and b"Too many connections" in text
    assert greeting(port, "127.0.0.16")[0] == 220  # another address is not affected
    for sock in held:
        sock.close()
    wait_until(lambda: server.server.conn_guard.open_connections("mx", "127.0.0.15") == 0)
    code, text = greeting(port, "127.0.0.15")  # the 3rd admitted connection this minute
    assert code == 220
    code, text = greeting(port, "127.0.0.15")
    assert code == 220
    code, text = greeting(port, "127.0.0.15")  # the 5th in a minute
    assert code == 421 and b"per minute" in text


def test_command_rate_limit_closes_the_session(server_factory: Any) -> None:
    server = server_factory(guard_config() | {"guard.max_commands_per_minute": 5})
    with smtplib.SMTP("127.0.0.1", server.ports["mx"]) as client:
        codes = [client.docmd("NOOP")[0] for _ in range(6)]
    assert codes == [250] * 5 + [421]


# ---- early talkers and slow clients ----------------------------------------------------------


def test_early_talker_is_rejected_with_554(server_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    server = server_factory(guard_config(early_talker=2) | {"guard.greet_delay": 0.5})
    port = server.ports["mx"]
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.17", 0)) as sock:
        sock.sendall(b"EHLO impatient.example\r\n")  # before the greeting
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"554 5.7.1") and b"220" not in data  # refused, never greeted, closed
    started = time.monotonic()
    code, _ = greeting(port, "127.0.0.18")  # a polite client waits and gets the greeting
    assert code == 220 and time.monotonic() - started >= 0.5
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.17", 0)) as sock:
        sock.sendall(b"QUIT\r\n")
        assert sock.recv(4096).startswith(b"554")
    assert greeting(port, "127.0.0.17")[0] == 421  # twice: banned
    assert any("event=close" in r.getMessage() and "reason=early_talker" in r.getMessage() for r in caplog.records)
    assert server.cli("ban", "list")[1].count("early_talker") == 1


def test_slowloris_is_cut_off_while_a_normal_client_completes(server_factory: Any) -> None:
    server: RunningServer = server_factory(guard_config() | {"smtp.command_timeout": 1, "smtp.data_timeout": 2})
    port = server.ports["mx"]
    results: dict[str, Any] = {}

    def slow_command(name: str) -> None:
        """Greeted, then one byte of a command line at a time, never finishing it."""
        with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=("127.0.0.19", 0)) as sock:
            started = time.monotonic()
            sock.recv(4096)
            reply = b""
            try:
                for byte in b"EHLO slowloris.example.and.some.more.bytes.to.trickle.forever":
                    sock.sendall(bytes([byte]))
                    sock.settimeout(0.2)
                    try:
                        reply += sock.recv(4096)
                    except TimeoutError:
                        continue
                    if reply:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            results[name] = (reply, time.monotonic() - started)

    def slow_data() -> None:
        """A proper session up to DATA, then the body one line at a time, slower than data_timeout allows."""
        with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=("127.0.0.20", 0)) as client:
            client.ehlo("slow.example")
            client.mail("slow@remote.test")
            client.rcpt(ALICE)
            client.putcmd("DATA")
            assert client.getreply()[0] == 354
            started = time.monotonic()
            reply = b""
            for i in range(40):
                try:
                    client.sock.sendall(b"line %d\r\n" % i)
                except (BrokenPipeError, ConnectionResetError):
                    break
                client.sock.settimeout(0.2)
                try:
                    reply += client.sock.recv(4096)
                except TimeoutError:
                    continue
                if reply:
                    break
            results["data"] = (reply, time.monotonic() - started)

    attackers = [threading.Thread(target=slow_command, args=(f"cmd{i}",)) for i in range(5)]
    attackers.append(threading.Thread(target=slow_data))
    for thread in attackers:
        thread.start()
    message = EmailMessage()
    message["From"] = "friend@remote.test"
    message["To"] = ALICE
    message["Subject"] = "sent while the slowloris waits"
    message.set_content("hello")
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        assert client.send_message(message) == {}
    assert time.monotonic() - started < 1.0  # served at once, not after the attackers
    for thread in attackers:
        thread.join(30)
    for i in range(5):
        reply, took = results[f"cmd{i}"]
        assert reply.startswith(b"421 4.4.2") and 0.9 <= took < 5
    reply, took = results["data"]
    assert reply.startswith(b"421 4.4.2") and 1.5 <= took < 6
    assert [row[3] for row in server.inbox(ALICE)] == ["sent while the slowloris waits"]


def test_ipv6_loopback_connection_is_guarded(server_factory: Any) -> None:
    """::1 is keyed per /64 like any IPv6 client (the aggregation itself is unit-tested in test_bans.py)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    server = server_factory({"listen.mx": "[::1]:0"} | guard_config() | {"guard.deny": ["mx:::/64"]})
    with socket.create_connection(("::1", server.ports["mx"]), timeout=10) as sock:
        assert sock.recv(4096).startswith(b"554 5.7.1")  # ::1 is in ::/64
