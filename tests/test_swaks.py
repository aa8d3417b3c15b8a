"""Interoperability with a real, independent SMTP client: swaks."""

from __future__ import annotations

import shutil
import subprocess

from tests.conftest import ALICE, ALICE_PW, BOB, RunningServer

SWAKS = shutil.which("swaks") or "swaks"  # `make test` installs the Debian package; a missing one fails loudly


def swaks(server: RunningServer, listener: str, *args: str) -> tuple[int, str]:
    """Run swaks against `listener`; returns (exit code, stdout + stderr)."""
    proc = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{server.ports[listener]}", "--ehlo", "laptop.test", "--timeout", "30", *args],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_587_starttls_auth_plain_delivers(server: RunningServer) -> None:
    code, out = swaks(
        server, "submission",
        "--tls", "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", ALICE_PW,
        "--from", ALICE, "--to", BOB, "--header", "Subject: swaks over 587",
    )  # fmt: skip
    assert code == 0, out
    assert "235 " in out and "250 2.0.0 Ok: queued as" in out
    assert [(r[2], r[3]) for r in server.inbox(BOB)] == [(ALICE, "swaks over 587")]


def test_465_implicit_tls_auth_login_delivers(server: RunningServer) -> None:
    code, out = swaks(
        server, "submissions",
        "--tlsc", "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", ALICE_PW,
        "--from", ALICE, "--to", BOB, "--header", "Subject: swaks over 465",
    )  # fmt: skip
    assert code == 0, out
    assert [(r[2], r[3]) for r in server.inbox(BOB)] == [(ALICE, "swaks over 465")]


def test_relay_without_auth_on_mx_is_refused(server: RunningServer) -> None:
    code, out = swaks(server, "mx", "--from", "spammer@remote.test", "--to", "victim@elsewhere.test")
    assert code != 0, out
    assert "554 5.7.1" in out
    server.wait_filed()
    assert server.cli("queue", "list")[1].count("\n") == 1  # header only: nothing queued


def test_auth_before_tls_on_587_is_refused(server: RunningServer) -> None:
    code, out = swaks(
        server, "submission",
        "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", ALICE_PW, "--from", ALICE, "--to", BOB,
    )  # fmt: skip
    assert code != 0, out
    assert "250-AUTH" not in out and "250 AUTH" not in out  # not advertised in plaintext
    assert "did not advertise authentication" in out  # so swaks never sent the credentials
    assert "235 " not in out
    assert server.inbox(BOB) == []


def test_wrong_password_on_465_gets_535(server: RunningServer) -> None:
    code, out = swaks(
        server, "submissions",
        "--tlsc", "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", "not the password",
        "--from", ALICE, "--to", BOB,
    )  # fmt: skip
    assert code != 0, out
    assert "535 5.7.8" in out
    assert server.inbox(BOB) == []
