"""The whole outbound path: submission, signing, the queue, MX delivery over STARTTLS to a real Postfix.

The message a user submits is found in the remote Postfix's mailbox, it got
there over TLS, and both DKIM signatures verify there, by our verifier and by
OpenDKIM, with the records `mailwarden dkim show` told the admin to publish.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from tests.conftest import ALICE, ALICE_PW, DnsServer
from tests.remote_mx import MX_ZONE, RemoteMx, remote_mx, wait_until
from tests.test_dkim_signing import opendkim_verdicts, publish_shown, verify

__all__ = ["remote_mx"]  # the fixture, imported for pytest


def test_submitted_mail_reaches_a_remote_postfix_over_tls_signed(
    server_factory, dns_server: DnsServer, remote_mx: RemoteMx, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ca_file = tmp_path / "remote-ca.pem"
    remote_mx.ca.cert_pem.write_to_path(str(ca_file))
    server = server_factory({"queue.paused": False, "delivery.port": remote_mx.port, "delivery.ca_file": str(ca_file)})
    publish_shown(server, dns_server)  # (clears the zone) our DKIM keys, as `dkim show` prints them
    dns_server.add(MX_ZONE + "partner.test. 300 IN MX 10 a.mx.test.\n")
    rcpt = "carol@partner.test"
    mark = remote_mx.mark()
    body = (
        f"From: Alice <{ALICE}>\r\nTo: Carol <{rcpt}>\r\nSubject: the contract\r\n"
        "Date: Tue, 3 Jun 2025 10:00:00 +0000\r\n\r\nCarol,\r\n.here it is.\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.ehlo("laptop")
        c.starttls(context=server.tls.client_context())
        c.ehlo("laptop")
        c.login(ALICE, ALICE_PW)
        assert c.sendmail(ALICE, [rcpt], body) == {}

    [arrived] = remote_mx.wait_messages(rcpt)
    remote_mx.wait_log(mark, "Anonymous TLS connection established from")
    assert b"with ESMTPS" in arrived  # Postfix's own Received header: the session was TLS
    assert b"\n.here it is.\n" in arrived  # dot-stuffing undone by the receiver, as it must be
    crlf = arrived.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # Postfix stores LF; verifiers read CRLF
    assert [(a, r) for a, _s, r in verify(dns_server, crlf)] == [("ed25519-sha256", "pass"), ("rsa-sha256", "pass")]
    assert opendkim_verdicts(tmp_path, dns_server, crlf) == [("pass", "ed25519-sha256"), ("pass", "rsa-sha256")]
    wait_until(lambda: server.call(server.server.store.list_queue()) == [], what="the queue to empty")


def test_a_null_mx_bounces_at_once_with_a_dsn(server_factory, dns_server: DnsServer) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"queue.paused": False})
    dns_server.add("nomail.test. 300 IN MX 0 .\n")  # RFC 7505: this domain accepts no mail
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.ehlo("laptop")
        c.starttls(context=server.tls.client_context())
        c.ehlo("laptop")
        c.login(ALICE, ALICE_PW)
        assert c.sendmail(ALICE, ["x@nomail.test"], f"From: {ALICE}\r\nSubject: hi\r\n\r\nhi\r\n".encode()) == {}
    rows = wait_until(lambda: [r for r in server.inbox(ALICE) if r[2].startswith("Mail Delivery System")], what="a DSN")
    dsn = server.message(ALICE, int(rows[0][0])).decode()
    assert "Status: 5.1.10" in dsn and "Final-Recipient: rfc822; x@nomail.test" in dsn
    assert server.call(server.server.store.list_queue()) == []
