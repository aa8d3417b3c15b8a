"""TLS policy as a client sees it: versions, cipher suites, compression, STARTTLS
injection, and certificate reload on SIGHUP.

Every refusal test first checks, against a deliberately permissive loopback
TLS server, that this machine's OpenSSL will actually offer what the test
asks for; otherwise the refusal would be the client's, not Mailwarden's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.conftest import RunningServer, TlsMaterial, make_instance, spawn_serve, start_server, stop_server

TLS_LISTENERS = ("submissions", "submission")  # 465 implicit TLS, 587 STARTTLS


# ---- certificates ---------------------------------------------------------------


def issue(directory: Path, key_type: trustme.KeyType, ca: trustme.CA | None = None, days: int | None = None) -> TlsMaterial:
    ca = ca or trustme.CA(key_type=key_type)
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=days) if days else None
    cert = ca.issue_cert("localhost", "127.0.0.1", "mail.example.test", key_type=key_type, not_after=not_after)
    directory.mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return TlsMaterial(ca, directory / "cert.pem", directory / "key.pem")


@pytest.fixture(scope="module")
def rsa_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return issue(tmp_path_factory.mktemp("rsa-tls"), trustme.KeyType.RSA)


@pytest.fixture(scope="module")
def rsa_server(tmp_path_factory: pytest.TempPathFactory, rsa_tls: TlsMaterial) -> Iterator[RunningServer]:
    rs = start_server(make_instance(tmp_path_factory.mktemp("rsa-instance"), rsa_tls), rsa_tls)
    yield rs
    stop_server(rs)


@pytest.fixture(params=["ecdsa", "rsa"])
def family(request: pytest.FixtureRequest) -> tuple[str, RunningServer]:
    """The server with trustme's default ECDSA certificate, and one with an RSA certificate."""
    name = request.param
    return name, request.getfixturevalue("server" if name == "ecdsa" else "rsa_server")


# ---- a small SMTP-over-socket client ---------------------------------------------


class Conn:
    """Blocking line reader over a socket that can be swapped for its TLS wrapper."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        """One (possibly multi-line) reply; lines without CRLF."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed by server; partial reply {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b"", f"server sent bytes after 220: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")


def plain(port: int) -> Conn:
    conn = Conn(socket.create_connection(("127.0.0.1", port), timeout=30))
    assert conn.reply()[0].startswith("220 ")
    return conn


def open_tls(server: RunningServer, listener: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS socket to 465, or to 587 after EHLO + STARTTLS done by hand."""
    port = server.ports[listener]
    if listener == "submissions":
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost")
    conn = plain(port)
    conn.send(b"EHLO laptop\r\n")
    assert "250 STARTTLS" in conn.reply()
    conn.send(b"STARTTLS\r\n")
    assert conn.reply()[0].startswith("220 ")
    conn.starttls(ctx)
    assert isinstance(conn.sock, ssl.SSLSocket)
    return conn.sock


# ---- client contexts ------------------------------------------------------------


def client_ctx(
    tls: TlsMaterial,
    *,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.ca.configure_trust(ctx)
    # Level 0 so that OpenSSL itself is willing to offer old versions and suites:
    # any refusal is then the server's.
    ctx.set_ciphers((ciphers or "ALL") + ":@SECLEVEL=0")
    ctx.minimum_version = min_version
    ctx.maximum_version = max_version
    return ctx


def permissive_server_accepts(tls: TlsMaterial, client: ssl.SSLContext) -> bool:
    """Can `client` complete a handshake with a server that allows everything?"""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(tls.cert), str(tls.key))
    sctx.set_ciphers("ALL:@SECLEVEL=0")
    sctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    sctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with sctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with client.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
            ) as s:
                s.sendall(b"x")
            return True
        except (ssl.SSLError, OSError):
            return False
        finally:
            t.join(10)


def assert_refused(server: RunningServer, listener: str, ctx: ssl.SSLContext) -> None:
    if not permissive_server_accepts(server.tls, ctx):
        pytest.skip("this machine's OpenSSL will not offer that protocol/cipher even to a permissive server")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with open_tls(server, listener, ctx) as s:
            # TLS 1.3 clients learn of a refusal late; force a round trip.
            s.sendall(b"NOOP\r\n")
            s.recv(1)


# ---- versions and suites -----------------------------------------------------------


@pytest.mark.parametrize("listener", TLS_LISTENERS)
def test_tls13_works_without_compression(server: RunningServer, listener: str) -> None:
    ctx = server.tls.client_context()
    with open_tls(server, listener, ctx) as s:
        assert s.version() == "TLSv1.3"
        assert s.compression() is None
        s.sendall(b"EHLO laptop\r\n")
        assert s.recv(3) == b"250"


@pytest.mark.parametrize("listener", TLS_LISTENERS)
def test_tls12_negotiates_ecdhe_aead(family: tuple[str, RunningServer], listener: str) -> None:
    name, server = family
    kx = "ECDSA" if name == "ecdsa" else "RSA"
    for suite in (f"ECDHE-{kx}-AES128-GCM-SHA256", f"ECDHE-{kx}-AES256-GCM-SHA384", f"ECDHE-{kx}-CHACHA20-POLY1305"):
        ctx = client_ctx(server.tls, max_version=ssl.TLSVersion.TLSv1_2, ciphers=suite)
        with open_tls(server, listener, ctx) as s:
            assert (s.version(), s.cipher()[0]) == ("TLSv1.2", suite)
            assert s.compression() is None
    # With the client offering everything, the server's preference is still ECDHE + AEAD.
    ctx = client_ctx(server.tls, max_version=ssl.TLSVersion.TLSv1_2)
    with open_tls(server, listener, ctx) as s:
        cipher = s.cipher()[0]
        assert s.version() == "TLSv1.2"
        assert cipher.startswith(f"ECDHE-{kx}-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1], ids=["TLSv1.1", "TLSv1.0"])
@pytest.mark.parametrize("listener", TLS_LISTENERS)
def test_old_protocol_versions_are_refused(server: RunningServer, listener: str, version: ssl.TLSVersion) -> None:
    ctx = client_ctx(server.tls, min_version=ssl.TLSVersion.MINIMUM_SUPPORTED, max_version=version)
    assert_refused(server, listener, ctx)


@pytest.mark.parametrize("listener", TLS_LISTENERS)
@pytest.mark.parametrize(
    "suites", ["AES256-GCM-SHA384", "AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "AES128-SHA"]
)
def test_tls12_without_ecdhe_is_refused(rsa_server: RunningServer, listener: str, suites: str) -> None:
    # Only an RSA certificate makes these suites possible at all (an ECDSA
    # certificate cannot do RSA or DHE-RSA key exchange), so this uses the RSA server.
    ctx = client_ctx(rsa_server.tls, max_version=ssl.TLSVersion.TLSv1_2, ciphers=suites)
    assert_refused(rsa_server, listener, ctx)


@pytest.mark.parametrize("listener", TLS_LISTENERS)
@pytest.mark.parametrize("mode", ["AES128-SHA", "AES256-SHA", "AES128-SHA256", "AES256-SHA384"])
def test_tls12_cbc_suites_are_refused(family: tuple[str, RunningServer], listener: str, mode: str) -> None:
    name, server = family
    suite = f"ECDHE-{'ECDSA' if name == 'ecdsa' else 'RSA'}-{mode}"
    ctx = client_ctx(server.tls, max_version=ssl.TLSVersion.TLSv1_2, ciphers=suite)
    assert_refused(server, listener, ctx)


# ---- sslyze --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sslyze_scan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, TlsMaterial]]:
    sslyze = pytest.importorskip("sslyze")
    # A 90-day certificate, as Mozilla's profiles ask for (trustme's default lasts centuries).
    material = issue(tmp_path_factory.mktemp("sslyze-tls"), trustme.KeyType.ECDSA, days=90)
    rs = start_server(make_instance(tmp_path_factory.mktemp("sslyze-instance"), material), material)
    try:
        from sslyze.mozilla_tls_profile.tls_config_checker import SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER

        ca_file = material.cert.parent / "ca.pem"
        request = sslyze.ServerScanRequest(
            server_location=sslyze.ServerNetworkLocation("localhost", rs.ports["submissions"], "127.0.0.1"),
            scan_commands=set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER),
            scan_commands_extra_arguments=sslyze.ScanCommandsExtraArguments(
                certificate_info=sslyze.CertificateInfoExtraArgument(custom_ca_file=ca_file)
            ),
        )
        scanner = sslyze.Scanner()
        scanner.queue_scans([request])
        results = list(scanner.get_results())
    finally:
        stop_server(rs)
    assert len(results) == 1
    result = results[0]
    assert result.scan_status == sslyze.ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    yield result, material


def test_sslyze_versions_suites_and_vulnerabilities(sslyze_scan: tuple[object, TlsMaterial]) -> None:
    result, _ = sslyze_scan
    scan = result.scan_result  # type: ignore[attr-defined]
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        attempt = getattr(scan, f"{old}_cipher_suites")
        assert attempt.result is not None, attempt.error_trace
        assert not attempt.result.is_tls_version_supported, old
    tls12 = scan.tls_1_2_cipher_suites.result
    accepted12 = {s.cipher_suite.name for s in tls12.accepted_cipher_suites}
    assert accepted12, "TLS 1.2 must remain available"
    for name in accepted12:
        assert name.startswith("TLS_ECDHE_") and ("_GCM_" in name or "CHACHA20_POLY1305" in name), name
    assert scan.tls_1_3_cipher_suites.result.is_tls_version_supported
    assert not scan.tls_compression.result.supports_compression
    assert scan.tls_fallback_scsv.result.supports_fallback_scsv
    assert not scan.heartbleed.result.is_vulnerable_to_heartbleed
    assert not scan.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection
    assert not scan.session_renegotiation.result.is_vulnerable_to_client_renegotiation_dos
    assert scan.tls_extended_master_secret.result.supports_ems_extension


def test_sslyze_mozilla_intermediate_profile(sslyze_scan: tuple[object, TlsMaterial]) -> None:
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )

    result, _ = sslyze_scan
    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(result, profile)  # type: ignore[arg-type]
    except ServerNotCompliantWithTlsConfiguration as exc:
        pytest.fail(f"not Mozilla-intermediate compliant: {exc.issues}")


# ---- STARTTLS command injection (CVE-2011-0411 class) ----------------------------------


def test_commands_pipelined_behind_starttls_are_discarded(server: RunningServer) -> None:
    conn = plain(server.ports["mx"])
    conn.send(b"EHLO x\r\n")
    assert "250 STARTTLS" in conn.reply()
    conn.send(b"STARTTLS\r\nRSET\r\n")  # one write: RSET travels in plaintext behind STARTTLS
    assert conn.reply()[0].startswith("220 ")
    conn.buf = b""  # anything further in plaintext would break the handshake anyway
    conn.sock = server.tls.client_context().wrap_socket(conn.sock, server_hostname="localhost")
    conn.send(b"EHLO x\r\n")
    first = conn.reply()
    assert first[0].startswith("250-"), f"first reply over TLS is not EHLO's: {first!r}"
    # HELP's 214 is a sentinel no RSET could produce: every reply queued before
    # it is now in hand, so exactly one block (EHLO's) must have come first.
    conn.send(b"HELP\r\n")
    blocks = [first]
    while not (reply := conn.reply())[0].startswith("214"):
        blocks.append(reply)
    assert blocks == [first], f"replies to injected plaintext commands arrived over TLS: {blocks[1:]!r}"
    conn.sock.close()


# ---- certificate reload on SIGHUP (real process) -----------------------------------------


def wait_for_log(path: Path, needle: str, start: int, timeout: float = 30) -> str:
    """Read `path` from byte `start` until a line containing `needle` appears."""
    deadline = time.monotonic() + timeout
    text = ""
    with path.open("r", errors="replace") as f:
        f.seek(start)
        while time.monotonic() < deadline:
            chunk = f.read()
            if chunk:
                text += chunk
                for line in text.splitlines():
                    if needle in line:
                        return line
            else:
                time.sleep(0.02)
    raise AssertionError(f"{needle!r} not logged within {timeout}s; log since: {text[-2000:]!r}")


def serial_on(port: int, ca: trustme.CA) -> int:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_certificate_and_sigterm_exits_cleanly(tmp_path: Path) -> None:
    ca = trustme.CA()
    first = issue(tmp_path / "tls-first", trustme.KeyType.ECDSA, ca)
    second = issue(tmp_path / "tls-second", trustme.KeyType.ECDSA, ca)
    live = tmp_path / "tls-live"
    live.mkdir()
    shutil.copy(first.cert, live / "cert.pem")
    shutil.copy(first.key, live / "key.pem")
    root = tmp_path / "instance"
    make_instance(root, TlsMaterial(ca, live / "cert.pem", live / "key.pem"))
    serve = spawn_serve(root)
    try:
        port = serve.ports["submissions"]
        before = serial_on(port, ca)
        assert before == x509.load_pem_x509_certificate(first.cert.read_bytes()).serial_number
        new_serial = x509.load_pem_x509_certificate(second.cert.read_bytes()).serial_number
        assert new_serial != before

        shutil.copy(second.key, live / "key.pem")
        shutil.copy(second.cert, live / "cert.pem")
        log = root / "serve.log"
        offset = log.stat().st_size
        serve.proc.send_signal(signal.SIGHUP)
        line = wait_for_log(log, "event=tls_reloaded", offset)
        assert str(live / "cert.pem") in line

        assert serial_on(port, ca) == new_serial
        assert serial_on(serve.ports["submissions"], ca) == new_serial  # and it stays
        # STARTTLS on 587 uses the same context.
        conn = plain(serve.ports["submission"])
        conn.send(b"EHLO laptop\r\n")
        conn.reply()
        conn.send(b"STARTTLS\r\n")
        assert conn.reply()[0].startswith("220 ")
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        conn.starttls(ctx)
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == new_serial
        conn.sock.close()
    finally:
        if serve.proc.poll() is None:
            serve.proc.send_signal(signal.SIGTERM)
        code = serve.proc.wait(30)
    assert code == 0, (root / "serve.log").read_text()[-2000:]
    assert "event=stopped" in (root / "serve.log").read_text()


