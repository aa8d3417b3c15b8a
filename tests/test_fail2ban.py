"""The shipped Fail2Ban filter against log lines the real server wrote, checked by Debian's fail2ban-regex.

The log format is an interface (docs/security.md): if a change to mailwarden/logs.py or to the
auth_fail/ban lines breaks the filter, these tests fail before an admin's jail silently stops banning.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from mailwarden import logs
from tests.conftest import ALICE, ALICE_PW, BOB, TlsMaterial, make_instance, spawn_serve

FILTER = Path(__file__).resolve().parent.parent / "contrib" / "fail2ban" / "filter.d" / "mailwarden.conf"

pytestmark = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None, reason="fail2ban-regex not installed (apt-get install fail2ban)"
)

# Logins tried with a wrong password. The last one tries to smuggle a second "ip=" into its own line.
BAD_LOGINS = (ALICE, BOB, "nobody@example.test", "root", "x ip=10.9.9.9 user=y")


def fail2ban_regex(log: Path, mode: str) -> tuple[int, list[str]]:
    """Run fail2ban-regex with the shipped filter in `mode`; (matched line count, hosts in match order)."""
    proc = subprocess.run(
        ["fail2ban-regex", "-v", str(log), f"{FILTER}[mode={mode}]"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    lines = re.search(r"^Lines: \d+ lines, \d+ ignored, (\d+) matched, \d+ missed", out, re.MULTILINE)
    assert lines, out
    # With -v every hit is listed under its regex as "|      HOST  DATE".
    results = out.split("\nResults\n", 1)[1].split("\nIgnoreregex:", 1)[0]
    hosts = re.findall(r"^\|\s{6}(\S+)\s{2}\S", results, re.MULTILINE)
    return int(lines.group(1)), hosts


def test_fail2ban_matches_each_failed_smtp_auth_of_the_real_server(tmp_path: Path, tls: TlsMaterial) -> None:
    root = tmp_path / "instance"
    make_instance(root, tls, {"listen.metrics": ""})
    serve = spawn_serve(root)
    try:
        start = serve.mark()
        for login in BAD_LOGINS:
            with smtplib.SMTP("127.0.0.1", serve.ports["submission"], timeout=30) as c:
                c.starttls(context=tls.client_context())
                c.ehlo("laptop")
                c.user, c.password = login, "not the password 123"
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    c.auth("PLAIN", c.auth_plain)  # one attempt (login() would retry with LOGIN)
        with smtplib.SMTP("127.0.0.1", serve.ports["submission"], timeout=30) as c:
            c.starttls(context=tls.client_context())
            c.login(ALICE, ALICE_PW)  # a success must not count
        serve.wait_for(("event=auth_fail",), count=len(BAD_LOGINS), start=start)
        serve.wait_for(("event=auth_ok",), start=start)
    finally:
        assert serve.stop() == 0

    log_text = serve.log.read_text()
    assert log_text.count("event=auth_fail") == len(BAD_LOGINS)
    assert "event=auth_ok" in log_text
    matched, hosts = fail2ban_regex(serve.log, "auth")
    assert matched == len(BAD_LOGINS)
    assert hosts == ["127.0.0.1"] * len(BAD_LOGINS)  # never the 10.9.9.9 a client wrote into its login

    # Bans the server itself logged (the guard, when it bans) are matched one for one in "ban" mode.
    matched_bans, _ = fail2ban_regex(serve.log, "ban")
    assert matched_bans == log_text.count("event=ban ")


def test_fail2ban_ban_mode_matches_the_ban_the_real_server_logged(tmp_path: Path, tls: TlsMaterial) -> None:
    """Three failed logins ban 127.0.0.1 (threshold lowered; one worker, which counts them all)."""
    root = tmp_path / "instance"
    make_instance(root, tls, {"listen.metrics": "", "server.workers": 1, "guard.ip_thresholds": {"auth_fail": 3}})
    serve = spawn_serve(root)
    try:
        start = serve.mark()
        for login in BAD_LOGINS[:3]:
            with smtplib.SMTP("127.0.0.1", serve.ports["submission"], timeout=30) as c:
                c.starttls(context=tls.client_context())
                c.ehlo("laptop")
                c.user, c.password = login, "not the password 123"
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    c.auth("PLAIN", c.auth_plain)
        serve.wait_for(("event=ban ",), start=start)
    finally:
        assert serve.stop() == 0
    assert serve.log.read_text().count("event=ban ") == 1
    assert fail2ban_regex(serve.log, "ban") == (1, ["127.0.0.1"])
    assert fail2ban_regex(serve.log, "auth") == (3, ["127.0.0.1"] * 3)


def test_fail2ban_ban_mode_matches_ban_lines_with_ips_and_cidrs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ban lines in the contract's format, written by the same log_event the server uses."""
    log = tmp_path / "bans.log"
    with log.open("w") as stream:
        monkeypatch.setattr(logs, "_direct_stream", stream)  # exactly how `serve` writes its lines
        logs.logger.setLevel("INFO")
        for ip in ("192.0.2.7", "2001:db8:1:2::/64", "198.51.100.0/24"):
            logs.log_event(
                "ban", level=30, ip=ip, scope="ip", reason="auth_fail", events=10, duration=600,
                until="2030-01-01T00:10:00Z",
            )  # fmt: skip
        logs.log_event("auth_fail", level=30, sid="s1", proto="imap", ip="203.0.113.9", user="a b")
        logs.log_event("ban_expired", ip="192.0.2.99")  # another event: never a ban
    matched, hosts = fail2ban_regex(log, "ban")
    assert (matched, hosts) == (3, ["192.0.2.7", "2001:db8:1:2::/64", "198.51.100.0/24"])
    matched, hosts = fail2ban_regex(log, "auth")
    assert (matched, hosts) == (1, ["203.0.113.9"])
    matched, _ = fail2ban_regex(log, "aggressive")
    assert matched == 4


def test_fail2ban_reads_journal_style_lines(tmp_path: Path) -> None:
    """Under the systemd backend Fail2Ban prefixes "HOST IDENT[PID]: " to Mailwarden's own line."""
    log = tmp_path / "journal.log"
    log.write_text(
        "mx1 mailwarden[812]: 2030-01-01 00:00:00 level=warning event=auth_fail sid=a proto=smtp ip=192.0.2.1 user=u\n"
        "mx1 mailwarden[812]: 2030-01-01 00:00:01 level=info event=auth_ok sid=b proto=smtp ip=192.0.2.2 user=u\n"
    )
    assert fail2ban_regex(log, "auth") == (1, ["192.0.2.1"])
