"""The `mailwarden` command as an administrator uses it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from mailwarden import __version__
from tests.conftest import ALICE, BOB, TlsMaterial, make_instance, run_cli


def test_init_dev_creates_instance_and_prints_dns_records(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    code, out, err = run_cli("--dir", str(root), "init", "--domain", "Example.TEST", "--dev")
    assert code == 0, err
    assert "example.test.  IN MX   10 localhost." in out
    assert '"v=spf1 mx -all"' in out
    assert "_dmarc.example.test.  IN TXT" in out and "v=DMARC1; p=quarantine" in out
    cfg = tomllib.loads((root / "mailwarden.toml").read_text())
    assert cfg["listen"] == {
        "mx": "127.0.0.1:2525",
        "submission": "127.0.0.1:2587",
        "submissions": "127.0.0.1:2465",
        "imap": "127.0.0.1:2143",
        "imaps": "127.0.0.1:2993",
        "web": "127.0.0.1:8443",
        "metrics": "127.0.0.1:9025",
    }
    key = root / "tls" / "key.pem"
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key.stat().st_mode & 0o077 == 0  # the private key is not readable by others
    assert run_cli("--dir", str(root), "domain", "list")[1] == "example.test\n"
    assert run_cli("--dir", str(root), "config", "check")[0] == 0
    # A second init never overwrites an instance.
    code, _, err = run_cli("--dir", str(root), "init", "--domain", "other.test")
    assert code == 1 and "already exists" in err


def test_users_domains_and_aliases(tmp_path: Path, tls: TlsMaterial) -> None:
    root = str(make_instance(tmp_path / "i", tls).root)
    assert run_cli("--dir", root, "user", "list")[1].split() == [ALICE, BOB]
    assert run_cli("--dir", root, "domain", "add", "second.test")[0] == 0
    assert run_cli("--dir", root, "alias", "add", "Sales@Second.test", ALICE)[0] == 0
    assert run_cli("--dir", root, "alias", "list")[1] == f"sales@second.test\t{ALICE}\n"
    code, _, err = run_cli("--dir", root, "alias", "add", "x@nothosted.test", ALICE)
    assert code == 1 and "hosted domain" in err
    assert run_cli("--dir", root, "alias", "del", "sales@second.test")[0] == 0
    assert run_cli("--dir", root, "alias", "list")[1] == ""
    assert run_cli("--dir", root, "user", "del", BOB)[0] == 0
    assert run_cli("--dir", root, "user", "list")[1].split() == [ALICE]
    code, _, err = run_cli(
        "--dir", root, "user", "add", "carol@nothosted.test", "--password-stdin", stdin="violet kettle harbour 93\n"
    )
    assert code == 1 and "not hosted" in err


def test_password_policy_applies_to_add_and_passwd(tmp_path: Path, tls: TlsMaterial) -> None:
    root = str(make_instance(tmp_path / "i", tls).root)
    for bad in ("short", "password123456", "carol-has-a-secret"):
        code, _, err = run_cli("--dir", root, "user", "add", "carol@example.test", "--password-stdin", stdin=bad + "\n")
        assert code == 1 and err.count("\n") == 1, (bad, err)
    assert "carol@example.test" not in run_cli("--dir", root, "user", "list")[1]
    code, _, err = run_cli("--dir", root, "user", "passwd", ALICE, "--password-stdin", stdin="123456789012\n")
    assert code == 1 and "sequence" in err
    assert (
        run_cli("--dir", root, "user", "passwd", ALICE, "--password-stdin", stdin="violet kettle harbour 93\n")[0] == 0
    )


def test_wrong_usage_is_one_line_and_nonzero(tmp_path: Path) -> None:
    for argv in (["frobnicate"], ["user"], ["user", "add"], ["mailbox", "cat", "a@b.test", "notanumber"]):
        code, _out, err = run_cli("--dir", str(tmp_path), *argv)
        assert code == 2, argv
        assert err.count("\n") == 1 and err.startswith("mailwarden"), err
    code, _, err = run_cli("--dir", str(tmp_path / "nothing"), "user", "list")
    assert code == 1 and err.count("\n") == 1 and "no instance" in err


def test_version_and_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailwarden", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"mailwarden {__version__}"


def test_mailbox_errors_are_one_line(tmp_path: Path, tls: TlsMaterial) -> None:
    root = str(make_instance(tmp_path / "i", tls).root)
    code, out, err = run_cli("--dir", root, "mailbox", "ls", ALICE)
    assert code == 0 and out == "UID\tDATE\tFROM\tSUBJECT\n"
    code, _, err = run_cli("--dir", root, "mailbox", "ls", ALICE, "--folder", "Nope")
    assert code == 1 and "no mailbox" in err
    code, _, err = run_cli("--dir", root, "mailbox", "cat", ALICE, "7")
    assert code == 1 and "no message with UID 7" in err
    code, _, err = run_cli("--dir", root, "queue", "show", "NOSUCH")
    assert code == 1 and "no queued message" in err
