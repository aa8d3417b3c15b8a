"""NftBanSet against the real kernel, inside a network namespace this test creates (never the host's ruleset).

A tiny TCP server listens on 127.0.0.1:25 and [::1]:25 inside the namespace; a client there connects
before the ban, times out (SYN dropped) during it, and connects again after `remove`. A short
timeout is checked to expire in the kernel by itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailwarden.config import validate
from mailwarden.security.nft import NftBanSet, NftError, render_definition
from tests.conftest import wait_until

SHIPPED = Path(__file__).resolve().parent.parent / "contrib" / "nftables" / "mailwarden.nft"

SERVER = """
import socket, sys
socks = []
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 25))
    s.listen(64)
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""

CLIENT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 25), timeout=float(sys.argv[2])).close()
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print("error", exc)
"""


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "nftables and network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create a network namespace and load nftables rules"
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install nftables iproute2)"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    name = f"mwtest{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this machine does not permit network namespaces: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        probe = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "ruleset"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"this machine does not permit nft: {probe.stderr.strip()}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def listener(netns: str) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


def connect(netns: str, host: str, timeout: float = 1.5) -> str:
    """A client inside the namespace: "connected", "timeout" (packets dropped) or "error ..." (refused)."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, host, str(timeout)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip()


def list_set(netns: str, name: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "list", "set", "inet", "mailwarden", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_shipped_definition_is_the_one_the_server_loads() -> None:
    assert SHIPPED.read_text() == render_definition()


def test_from_config_is_off_by_default() -> None:
    assert NftBanSet.from_config(validate({}, Path("/tmp"))) is None
    on = NftBanSet.from_config(validate({"firewall": {"nftables": True}}, Path("/tmp")))
    assert isinstance(on, NftBanSet) and (on.family, on.table, on.create) == ("inet", "mailwarden", True)


def test_banned_client_is_dropped_until_unban(netns: str, listener: None) -> None:
    bans = NftBanSet(command_prefix=["ip", "netns", "exec", netns])
    asyncio.run(bans.setup())  # the table is missing in the fresh namespace: setup loads it
    assert connect(netns, "127.0.0.1") == "connected"
    assert connect(netns, "::1") == "connected"

    asyncio.run(bans.add(ipaddress.ip_network("127.0.0.1/32"), 600))
    assert "127.0.0.1 timeout 10m" in list_set(netns, "banned4")
    assert connect(netns, "127.0.0.1") == "timeout"
    assert connect(netns, "::1") == "connected"  # only the banned address

    asyncio.run(bans.add(ipaddress.ip_network("::/64"), 600))  # an IPv6 subnet ban holds ::1
    assert "::/64 timeout 10m" in list_set(netns, "banned6")
    assert connect(netns, "::1") == "timeout"

    asyncio.run(bans.remove(ipaddress.ip_network("127.0.0.1/32")))
    asyncio.run(bans.remove(ipaddress.ip_network("::/64")))
    assert connect(netns, "127.0.0.1") == "connected"
    assert connect(netns, "::1") == "connected"
    asyncio.run(bans.remove(ipaddress.ip_network("127.0.0.1/32")))  # unbanning twice is no error


def test_element_expires_on_its_own_and_rebans_take_the_new_timeout(netns: str) -> None:
    bans = NftBanSet(command_prefix=["ip", "netns", "exec", netns])
    asyncio.run(bans.setup())
    asyncio.run(bans.setup())  # a second start finds the table and leaves it as it is
    asyncio.run(bans.add(ipaddress.ip_network("192.0.2.7/32"), 3600))
    asyncio.run(bans.add(ipaddress.ip_network("192.0.2.7/32"), 2))  # re-ban: the newest length wins
    asyncio.run(bans.add(ipaddress.ip_network("::ffff:198.51.100.9/128"), 3600))  # IPv4-mapped: the v4 set
    listing = list_set(netns, "banned4")
    assert "192.0.2.7 timeout 2s" in listing and "198.51.100.9 timeout 1h" in listing
    wait_until(lambda: "192.0.2.7" not in list_set(netns, "banned4"), 15, "the 2 s element to expire")
    assert "198.51.100.9" in list_set(netns, "banned4")


def test_setup_refuses_a_missing_table_when_not_allowed_to_create_it(netns: str) -> None:
    bans = NftBanSet(create=False, command_prefix=["ip", "netns", "exec", netns])
    with pytest.raises(NftError, match="No such file or directory"):
        asyncio.run(bans.setup())
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input="table inet mailwarden { set banned4 { type ipv4_addr; }; }\n",
        text=True,
        check=True,
    )
    with pytest.raises(NftError, match="banned4 must be"):
        asyncio.run(bans.setup())
