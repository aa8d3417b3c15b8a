"""A private, throw-away Postfix instance for the benchmarks in bench/ (stdlib only).

`Postfix(root, domain, rcpt)` sets up a Postfix of its own under root/postfix (own main.cf and
master.cf, queue and data directories, started with `postfix -c DIR`; /etc/postfix is not touched)
that listens only on a free 127.0.0.1 port and delivers `rcpt` with virtual(8) into a Maildir, as a
system user (VMAIL_USER) that it creates if missing and deletes again on stop if it created it.
Postfix keeps its normal fsyncs; DNS and peer-name lookups are off, in_flow_delay = 0,
default_process_limit = 100, no client connection limits, no chroot (bench/README.md).

The mailbox is counted as the files in Maildir/new; reset() empties the Maildir before a run.
Needs root, and the directory that holds root/postfix must be traversable by the postfix and
vmail users (mode 0755).

The scripts import this as `import postfix_peer`: they run as bench/NAME, so bench/ is sys.path[0].
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VMAIL_USER = "mwbench"
TOOLS = ("postfix", "postconf", "postmap")  # what Postfix.start runs (smtp-source is the load, not the peer)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its output if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held open until every port is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s") from None
            time.sleep(0.1)


def missing_tools(tools: tuple[str, ...] = TOOLS) -> list[str]:
    """Those of `tools` that are not on PATH."""
    return [tool for tool in tools if not shutil.which(tool)]


def vmail_user(name: str) -> tuple[pwd.struct_passwd, bool]:
    """The system user virtual(8) delivers as, created (no home, no shell) if missing; True if created."""
    try:
        return pwd.getpwnam(name), False
    except KeyError:
        pass
    run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]
    )
    return pwd.getpwnam(name), True


class Postfix:
    name = "postfix"

    def __init__(self, root: Path, domain: str, rcpt: str, vmail: str = VMAIL_USER) -> None:
        self.root = root / "postfix"
        self.etc = self.root / "etc"
        self.domain = domain
        self.rcpt = rcpt
        self.vmail = vmail
        self.port = 0
        self.started = False
        self.created_user = False
        self.mailbox = f"{domain}/{rcpt.split('@', 1)[0]}/"  # relative to virtual_mailbox_base
        self.maildir = self.root / "vmail" / self.mailbox

    @staticmethod
    def version() -> str:
        return run(["postconf", "-d", "-h", "mail_version"]).stdout.strip()

    def start(self) -> None:
        pw, self.created_user = vmail_user(self.vmail)
        for sub in ("etc", "queue", "data", "vmail"):
            (self.root / sub).mkdir(parents=True)
        os.chown(self.root / "data", pwd.getpwnam("postfix").pw_uid, -1)
        os.chown(self.root / "vmail", pw.pw_uid, pw.pw_gid)
        master_cf = Path("/usr/share/postfix/master.cf.dist")
        shutil.copy(master_cf if master_cf.exists() else Path("/etc/postfix/master.cf"), self.etc / "master.cf")
        (self.etc / "vmailbox").write_text(f"{self.rcpt} {self.mailbox}\n")
        self.port = free_ports(1)[0]
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.root / "queue",
            "data_directory": self.root / "data",
            "syslog_name": "postfix-bench",
            "maillog_file": self.root / "maillog",
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
            "myhostname": "postfix.bench.local",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            "disable_dns_lookups": "yes",
            "default_process_limit": "100",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "in_flow_delay": "0",
            "biff": "no",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_maps": f"hash:{self.etc / 'vmailbox'}",
            "virtual_mailbox_base": self.root / "vmail",
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        pc = ["postconf", "-c", str(self.etc)]
        run([*pc, "-MX", "smtp/inet"])  # no listener on port 25
        run([*pc, "-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd"])
        # No chroot: the private queue directory has no copies of /etc files for a chroot.
        run([*pc, "-F", "*/*/chroot=n"])
        run(["postmap", str(self.etc / "vmailbox")])
        run(["postfix", "-c", str(self.etc), "check"])
        run(["postfix", "-c", str(self.etc), "start"])
        self.started = True
        wait_for_port(self.port, 30)

    def reset(self) -> None:
        """Empty the maildir so each run counts from zero and polling stays cheap."""
        for sub in ("new", "cur"):
            d = self.maildir / sub
            if d.is_dir():
                for entry in os.scandir(d):
                    os.unlink(entry.path)

    def count(self) -> int:
        try:
            with os.scandir(self.maildir / "new") as it:
                return sum(1 for _ in it)
        except FileNotFoundError:
            return 0

    def log_tail(self, n: int = 2000) -> str:
        """The end of this instance's maillog (for error messages)."""
        with contextlib.suppress(OSError):
            return (self.root / "maillog").read_text(errors="replace")[-n:]
        return ""

    def master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / "queue" / "pid" / "master.pid").read_text().strip())
        return None

    def stop(self) -> None:
        if self.started:
            pid = self.master_pid()
            subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
            deadline = time.monotonic() + 20
            while pid and time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                if pid:
                    log(f"postfix master {pid} did not stop within 20s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.started = False
        if self.created_user:
            subprocess.run(["userdel", self.vmail], capture_output=True)
            self.created_user = False
