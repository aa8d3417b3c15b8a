"""TLS policy as a client sees it: versions, cipher suites, compression, STARTTLS
injection, and certificate reload on SIGHUP.

Every refusal test first checks, against a deliberately permissive loopback
TLS server, that this machine's OpenSSL will actually offer what the test
asks for; otherwise the refusal would be the client's, not Mailwarden's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.conftest import (
    RunningServer,
    ServeProcess,
    TlsMaterial,
    make_instance,
    spawn_serve,
    start_server,
    stop_server,
)

TLS_LISTENERS = ("submissions", "submission")  # 465 implicit TLS, 587 STARTTLS


# ---- certificates ---------------------------------------------------------------


def issue(directory: Path, key_type: trustme.KeyType, ca: trustme.CA | None = None) -> TlsMaterial:
    ca = ca or trustme.CA(key_type=key_type)
    cert = ca.issue_cert("localhost", "127.0.0.1", "mail.example.test", key_type=key_type)
    directory.mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return TlsMaterial(ca, directory / "cert.pem", directory / "key.pem")


def strict_cert(directory: Path) -> TlsMaterial:
    """A CA and a 90-day P-256 leaf that pass cryptography's RFC 5280 path validation.

    trustme marks subjectAltName critical next to a non-empty subject, which
    strict validators (sslyze uses cryptography's) reject, and its leaves last
    centuries where Mozilla's profiles allow 366 days.
    """
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mailwarden test CA")])
    usage = dict.fromkeys(
        (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=89))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    # The trustme CA is unused by the sslyze tests; TlsMaterial wants one.
    return TlsMaterial(trustme.CA(), directory / "cert.pem", directory / "key.pem")


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

    @property
    def tls(self) -> ssl.SSLSocket:
        assert isinstance(self.sock, ssl.SSLSocket)
        return self.sock

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def plain(port: int) -> Conn:
    conn = Conn(socket.create_connection(("127.0.0.1", port), timeout=30))
    assert conn.reply()[0].startswith("220 ")
    return conn


def open_tls(server: RunningServer, listener: str, ctx: ssl.SSLContext) -> Conn:
    """TLS to 465, or to 587 after EHLO + STARTTLS done by hand; the next reply read answers our next command."""
    port = server.ports[listener]
    if listener == "submissions":
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        conn = Conn(ctx.wrap_socket(raw, server_hostname="localhost"))
        assert conn.reply()[0].startswith("220 ")
        return conn
    conn = plain(port)
    conn.send(b"EHLO laptop\r\n")
    assert "250 STARTTLS" in conn.reply()
    conn.send(b"STARTTLS\r\n")
    assert conn.reply()[0].startswith("220 ")
    conn.starttls(ctx)
    return conn


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


@pytest.fixture(scope="module")
def dh_params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dh

    path = tmp_path_factory.mktemp("dh") / "dh.pem"
    params = dh.generate_parameters(2, 1024)
    path.write_bytes(params.parameter_bytes(serialization.Encoding.PEM, serialization.ParameterFormat.PKCS3))
    return path


def permissive_server_accepts(tls: TlsMaterial, client: ssl.SSLContext, dh_params: Path) -> bool:
    """Can `client` complete a handshake with a server that allows everything?"""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(tls.cert), str(tls.key))
    sctx.set_ciphers("ALL:@SECLEVEL=0")
    sctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    sctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    sctx.load_dh_params(str(dh_params))  # so DHE suites are possible too
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


def assert_refused(server: RunningServer, listener: str, ctx: ssl.SSLContext, dh_params: Path) -> None:
    if not permissive_server_accepts(server.tls, ctx, dh_params):
        pytest.skip("this machine's OpenSSL will not offer that protocol/cipher even to a permissive server")
    with pytest.raises((ssl.SSLError, ConnectionError)), open_tls(server, listener, ctx) as c:
        # TLS 1.3 clients learn of a refusal late; force a round trip.
        c.send(b"NOOP\r\n")
        c.reply()


# ---- versions and suites -----------------------------------------------------------


@pytest.mark.parametrize("listener", TLS_LISTENERS)
def test_tls13_works_without_compression(server: RunningServer, listener: str) -> None:
    ctx = server.tls.client_context()
    with open_tls(server, listener, ctx) as c:
        assert c.tls.version() == "TLSv1.3"
        assert c.tls.compression() is None
        c.send(b"EHLO laptop\r\n")
        assert "250 AUTH PLAIN LOGIN" in c.reply()


@pytest.mark.parametrize("listener", TLS_LISTENERS)
def test_tls12_negotiates_ecdhe_aead(family: tuple[str, RunningServer], listener: str) -> None:
    name, server = family
    kx = "ECDSA" if name == "ecdsa" else "RSA"
    for suite in (f"ECDHE-{kx}-AES128-GCM-SHA256", f"ECDHE-{kx}-AES256-GCM-SHA384", f"ECDHE-{kx}-CHACHA20-POLY1305"):
        ctx = client_ctx(server.tls, max_version=ssl.TLSVersion.TLSv1_2, ciphers=suite)
        with open_tls(server, listener, ctx) as c:
            assert (c.tls.version(), c.tls.cipher()[0]) == ("TLSv1.2", suite)
            assert c.tls.compression() is None
            c.send(b"NOOP\r\n")
            assert c.reply()[0].startswith("250")
    # With the client offering everything, the server's preference is still ECDHE + AEAD.
    ctx = client_ctx(server.tls, max_version=ssl.TLSVersion.TLSv1_2)
    with open_tls(server, listener, ctx) as c:
        cipher = c.tls.cipher()[0]
        assert c.tls.version() == "TLSv1.2"
        assert cipher.startswith(f"ECDHE-{kx}-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1], ids=["TLSv1.1", "TLSv1.0"])
@pytest.mark.parametrize("listener", TLS_LISTENERS)
def test_old_protocol_versions_are_refused(
    server: RunningServer, listener: str, version: ssl.TLSVersion, dh_params: Path
) -> None:
    ctx = client_ctx(server.tls, min_version=ssl.TLSVersion.MINIMUM_SUPPORTED, max_version=version)
    assert_refused(server, listener, ctx, dh_params)


@pytest.mark.parametrize("listener", TLS_LISTENERS)
@pytest.mark.parametrize(
    "suites", ["AES256-GCM-SHA384", "AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "AES128-SHA"]
)
def test_tls12_without_ecdhe_is_refused(rsa_server: RunningServer, listener: str, suites: str, dh_params: Path) -> None:
    # Only an RSA certificate makes these suites possible at all (an ECDSA
    # certificate cannot do RSA or DHE-RSA key exchange), so this uses the RSA server.
    ctx = client_ctx(rsa_server.tls, max_version=ssl.TLSVersion.TLSv1_2, ciphers=suites)
    assert_refused(rsa_server, listener, ctx, dh_params)


@pytest.mark.parametrize("listener", TLS_LISTENERS)
@pytest.mark.parametrize("mode", ["AES128-SHA", "AES256-SHA", "AES128-SHA256", "AES256-SHA384"])
def test_tls12_cbc_suites_are_refused(
    family: tuple[str, RunningServer], listener: str, mode: str, dh_params: Path
) -> None:
    name, server = family
    suite = f"ECDHE-{'ECDSA' if name == 'ecdsa' else 'RSA'}-{mode}"
    ctx = client_ctx(server.tls, max_version=ssl.TLSVersion.TLSv1_2, ciphers=suite)
    assert_refused(server, listener, ctx, dh_params)


# ---- sslyze --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sslyze_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, TlsMaterial]:
    import sslyze  # a test dependency (pyproject [test]); missing means a broken install, not a skip

    material = strict_cert(tmp_path_factory.mktemp("sslyze-tls"))
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
    return result, material


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


def mozilla_intermediate_issues(result: object) -> dict[str, str]:
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )

    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(result, profile)  # type: ignore[arg-type]
    except ServerNotCompliantWithTlsConfiguration as exc:
        return dict(exc.issues)
    return {}


def test_sslyze_mozilla_intermediate_profile(sslyze_scan: tuple[object, TlsMaterial]) -> None:
    issues = mozilla_intermediate_issues(sslyze_scan[0])
    issues.pop("tls_curves", None)  # its own test below
    assert issues == {}


@pytest.mark.xfail(
    strict=True,
    reason="key-exchange groups are OpenSSL's defaults, which add X448 and secp521r1 to Mozilla's "
    "X25519/P-256/P-384; Python 3.11's ssl module has no API to set a group list",
)
def test_sslyze_mozilla_intermediate_key_exchange_groups(sslyze_scan: tuple[object, TlsMaterial]) -> None:
    assert "tls_curves" not in mozilla_intermediate_issues(sslyze_scan[0])


# ---- STARTTLS command injection (CVE-2011-0411 class) ----------------------------------


def test_commands_pipelined_behind_starttls_are_discarded(server: RunningServer) -> None:
    assert_starttls_drops_pipelined_plaintext(server.ports["mx"], server.tls)


def test_pipelined_plaintext_is_discarded_by_the_real_serve_too(tmp_path: Path, tls: TlsMaterial) -> None:
    """The same check against `mailwarden serve`: uvloop and two worker processes."""
    root = tmp_path / "instance"
    make_instance(root, tls, {"server.workers": 2})
    proc = spawn_serve(root)
    try:
        for listener in ("mx", "submission"):
            assert_starttls_drops_pipelined_plaintext(proc.ports[listener], tls)
    finally:
        assert proc.stop() == 0


def assert_starttls_drops_pipelined_plaintext(port: int, tls: TlsMaterial) -> None:
    conn = plain(port)
    conn.send(b"EHLO x\r\n")
    assert "250 STARTTLS" in conn.reply()
    conn.send(b"STARTTLS\r\nRSET\r\n")  # one write: RSET travels in plaintext behind STARTTLS
    assert conn.reply()[0].startswith("220 ")
    conn.starttls(tls.client_context())  # checks that nothing else came in plaintext
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


# ---- certificate reload on SIGHUP, clean stop on SIGTERM (real processes) ------------------


def serial_on(port: int, ca: trustme.CA) -> int:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(material: TlsMaterial) -> int:
    return x509.load_pem_x509_certificate(material.cert.read_bytes()).serial_number


def stop_process(serve: ServeProcess, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    """Send `sig` and wait; None if it did not exit (it is then killed, and its workers with it)."""
    try:
        if serve.proc.poll() is None:
            serve.proc.send_signal(sig)
        try:
            return serve.wait(timeout)
        except subprocess.TimeoutExpired:
            serve.proc.kill()  # workers follow: they get SIGTERM when the supervisor dies
            serve.wait(10)
            return None
    finally:
        assert serve.proc.stdout is not None
        serve.proc.stdout.close()


@dataclass
class LiveCert:
    """An instance whose tls.cert / tls.key are files the test may overwrite."""

    root: Path
    ca: trustme.CA
    first: TlsMaterial
    second: TlsMaterial
    live: TlsMaterial

    @property
    def log(self) -> Path:
        return self.root / "serve.log"

    def swap(self) -> None:
        shutil.copy(self.second.key, self.live.key)
        shutil.copy(self.second.cert, self.live.cert)


def live_cert_instance(tmp_path: Path, workers: int) -> LiveCert:
    ca = trustme.CA()
    first = issue(tmp_path / "tls-first", trustme.KeyType.ECDSA, ca)
    second = issue(tmp_path / "tls-second", trustme.KeyType.ECDSA, ca)
    (tmp_path / "tls-live").mkdir()
    live = TlsMaterial(ca, tmp_path / "tls-live" / "cert.pem", tmp_path / "tls-live" / "key.pem")
    shutil.copy(first.cert, live.cert)
    shutil.copy(first.key, live.key)
    root = tmp_path / "instance"
    make_instance(root, live, {"server.workers": workers})
    return LiveCert(root, ca, first, second, live)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sighup_reloads_certificate_and_sigterm_exits_cleanly(tmp_path: Path, workers: int) -> None:
    inst = live_cert_instance(tmp_path, workers)
    serve = spawn_serve(inst.root)
    try:
        if workers > 1:
            # `event=ready` comes before the workers have their signal handlers
            # (see test_sighup_right_after_ready_reloads_every_worker); wait for them.
            serve.wait_for(("event=worker_started",), count=workers)
        port = serve.ports["submissions"]
        assert serial_on(port, inst.ca) == serial_of(inst.first)
        assert serial_of(inst.second) != serial_of(inst.first)

        inst.swap()
        offset = serve.mark()
        serve.proc.send_signal(signal.SIGHUP)
        lines = serve.wait_for(("event=tls_reloaded", "event=tls_reload_failed"), start=offset, count=workers)
        assert all("event=tls_reloaded" in line and str(inst.live.cert) in line for line in lines), lines

        for _ in range(2 * workers):  # the kernel spreads connections over the workers
            assert serial_on(port, inst.ca) == serial_of(inst.second)
        # STARTTLS on 587 uses the same certificate.
        conn = plain(serve.ports["submission"])
        conn.send(b"EHLO laptop\r\n")
        conn.reply()
        conn.send(b"STARTTLS\r\n")
        assert conn.reply()[0].startswith("220 ")
        ctx = ssl.create_default_context()
        inst.ca.configure_trust(ctx)
        conn.starttls(ctx)
        der = conn.tls.getpeercert(binary_form=True)
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == serial_of(inst.second)
        conn.sock.close()
        assert "worker_exited" not in inst.log.read_text()
    finally:
        code = stop_process(serve)
    assert code == 0, inst.log.read_text()[-2000:]
    assert "event=stopped" in inst.log.read_text()


def test_sighup_right_after_ready_reloads_every_worker(tmp_path: Path) -> None:
    inst = live_cert_instance(tmp_path, workers=2)
    serve = spawn_serve(inst.root)
    try:
        inst.swap()
        serve.proc.send_signal(signal.SIGHUP)  # an admin renewing a certificate during start-up
        serve.wait_for(("event=worker_started",), count=2)
        lines = serve.wait_for(("event=tls_reloaded", "event=worker_exited"), count=2, timeout=10)
        assert all("event=tls_reloaded" in line for line in lines), lines
        assert serial_on(serve.ports["submissions"], inst.ca) == serial_of(inst.second)
    finally:
        code = stop_process(serve)
    assert code == 0


def test_sigterm_while_a_worker_is_being_restarted_exits_cleanly(tmp_path: Path) -> None:
    inst = live_cert_instance(tmp_path, workers=2)
    serve = spawn_serve(inst.root)
    try:
        started = serve.wait_for(("event=worker_started worker=0 ",))[0]
        serve.wait_for(("event=worker_started",), count=2)
        worker_pid = int(started.split(" pid=")[1].split()[0])
        offset = serve.mark()
        os.kill(worker_pid, signal.SIGKILL)  # a worker crashes...
        serve.wait_for(("event=worker_exited",), start=offset)
    finally:
        code = stop_process(serve, timeout=10)  # ...and the admin stops the server while it is restarted
    assert code == 0, "supervisor did not exit on SIGTERM"
