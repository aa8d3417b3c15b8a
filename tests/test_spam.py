"""The spam classifier: features, the model, per-user learning from Junk moves, the CLI and the MX end to end.

tests/data/spam_corpus is a small subset (40 spam, 39 ham) of the SpamAssassin
public corpus, all from the held-out fifth the shipped model never saw (its
NOTICE is beside it).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import imaplib
import logging
import re
import smtplib
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden.checks.result import CheckResult
from mailwarden.checks.spam import features as feat
from mailwarden.checks.spam.check import SpamCheck, UserDeltas, load_model
from mailwarden.checks.spam.corpus import held_out, message_files, read_labels, read_message
from mailwarden.checks.spam.model import Model, hash_features, learn_one, sigmoid, train
from mailwarden.pipeline.junk_training import junk_label
from mailwarden.storage.interfaces import StorageError
from mailwarden.storage.sql import SqlStore
from tests.conftest import ALICE, BOB, BOB_PW, RunningServer, run_cli, wait_until
from tests.test_compromise import HIGH_QUOTAS, login, statuses, with_postmaster

CORPUS = Path(__file__).parent / "data" / "spam_corpus"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def names(message: bytes, **kw: Any) -> set[str]:
    return {f.decode("utf-8", "replace") for f in feat.extract(message, **kw)}


def multipart(*parts: tuple[str, str, bytes], subject: str = "hi") -> bytes:
    """A multipart/mixed message of (content type, filename, body) parts, bodies base64."""
    out = [
        f"From: Sender <s@remote.test>\r\nTo: {BOB}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n'
    ]
    for ctype, filename, body in parts:
        disp = f'Content-Disposition: attachment; filename="{filename}"\r\n' if filename else ""
        out.append(
            f"--b0\r\nContent-Type: {ctype}\r\n{disp}Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(body).decode().replace("\n", "\r\n")
        )
    out.append("--b0--\r\n")
    return "".join(out).encode()


def exif_jpeg(make: str, description: str, comment: str) -> bytes:
    """A JPEG with an EXIF APP1 (IFD0: Make, ImageDescription) and a COM segment, built byte by byte."""
    values = [(0x010F, make.encode() + b"\x00"), (0x010E, description.encode() + b"\x00")]
    ifd_size = 2 + 12 * len(values) + 4
    data_at = 8 + ifd_size
    entries, blob = b"", b""
    for tag, value in values:
        if len(value) <= 4:
            entries += struct.pack("<HHI4s", tag, 2, len(value), value.ljust(4, b"\x00"))
        else:
            entries += struct.pack("<HHII", tag, 2, len(value), data_at + len(blob))
            blob += value
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(values)) + entries + b"\x00" * 4 + blob
    app1 = b"Exif\x00\x00" + tiff
    com = comment.encode()
    return (
        b"\xff\xd8"
        + b"\xff\xe1"
        + struct.pack(">H", len(app1) + 2)
        + app1
        + b"\xff\xfe"
        + struct.pack(">H", len(com) + 2)
        + com
        + b"\xff\xda\x00\x02"
        + b"\x00" * 16
        + b"\xff\xd9"
    )


def png_with_text(key: str, text: str) -> bytes:
    chunk = key.encode() + b"\x00" + text.encode()
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(chunk)) + b"tEXt" + chunk + b"\x00" * 4


# ---- features ---------------------------------------------------------------------


def test_html_tags_urls_and_their_domains_are_features() -> None:
    html = (
        b"<html><body><font color=red size=7>CHEAP</font> <a href='http://deals.shop.example.co.uk/buy?now'>x</a>"
        b"<div style='display:none'>hidden words</div><img src='http://192.0.2.7/p.gif'></body></html>"
    )
    got = names(multipart(("text/html; charset=iso-8859-1", "", html)))
    assert {"tag:font", "attr:font.color", "attr:font.size", "tag:a", "attr:a.href", "tag:img"} <= got
    assert {"url:deals.shop.example.co.uk", "urld:example.co.uk", "urlp:buy", "url:ip"} <= got
    assert {"html:hidden", "meta:html_only", "cheap", "hidden", "charset:iso-8859-1", "ct:text/html"} <= got
    assert "meta:no_text" not in got


def test_headers_attachments_and_auth_results_are_features() -> None:
    msg = multipart(
        ("text/plain", "", b"Please see the invoice."),
        ("application/octet-stream", "Invoice_2024.pdf.exe", b"MZ\x90\x00"),
        subject="URGENT PAYMENT NOTICE!!",
    )
    got = names(msg, auth=[("spf", "fail"), ("dmarc", "fail")])
    assert {"subject:urgent", "subject:payment", "meta:subject_caps", "meta:subject_bang", "from:@remote.test"} <= got
    assert {"att", "att:ext:exe", "att:double_ext", "att:name:invoice_2024", "att:ct:application/octet-stream"} <= got
    assert {"auth:spf=fail", "auth:dmarc=fail", "h:mime-version", "invoice"} <= got
    # Verdicts of other filters (or forged by the sender) never count.
    forged = b"X-Spam-Status: No, score=-5\r\nAuthentication-Results: mx.test; spf=pass\r\n" + msg
    assert not any(n.startswith(("h:x-spam", "h:authentication")) for n in names(forged))


def test_exif_and_jpeg_comment_text_of_an_attached_image_are_features() -> None:
    jpeg = exif_jpeg("SpamCam", "Cheap pills online", "Viagra discount")
    got = names(multipart(("text/plain", "", b"see photo"), ("image/jpeg", "photo.jpg", jpeg)))
    assert {"img:jpeg", "img:meta", "img:spamcam", "img:cheap", "img:pills", "img:viagra", "img:discount"} <= got
    assert {"att:ext:jpg", "ct:image/jpeg"} <= got
    png = png_with_text("Comment", "casino bonus")
    got = names(multipart(("image/png", "a.png", png)))
    assert {"img:png", "img:casino", "img:bonus", "img:comment"} <= got


def test_auth_results_come_from_our_own_header_only() -> None:
    ours = b"Authentication-Results: mail.example.test;\r\n\tspf=fail smtp.mailfrom=x.test;\r\n\tdkim=none\r\n"
    msg = ours + b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\n"
    assert feat.auth_from_header(msg, "mail.example.test") == [("dkim", "none"), ("spf", "fail")]
    assert feat.auth_from_header(msg, "other.test") == []
    results = [CheckResult("spf", "pass", ""), CheckResult("dkim", "off", ""), CheckResult("uribl", "listed", "")]
    assert feat.auth_pairs(results) == [("spf", "pass")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_any_bytes_give_bounded_features_without_raising(data: bytes) -> None:
    got = feat.extract(data)
    assert len(got) <= feat.MAX_FEATURES and all(isinstance(f, bytes) for f in got)


_MIME_BITS = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=x\r\n",
        b"Content-Type: text/html; charset=utf-8\r\n",
        b"Content-Type: image/jpeg\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b'Content-Disposition: attachment; filename="=?utf-8?q?a=FF.exe?="\r\n',
        b"Subject: =?bogus?b?!!!?=\r\n",
        b"--x\r\n",
        b"--x--\r\n",
        b"\r\n",
        b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00*\x00\x00\x00\x08",
        b"<a href=http://\xff\xfe.example/>",
        b"=\r\n",
        b"AAAA====",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_MIME_BITS, st.binary(max_size=40)), max_size=60))
def test_hostile_mime_fragments_never_raise(parts: list[bytes]) -> None:
    assert len(feat.extract(b"".join(parts))) <= feat.MAX_FEATURES


@given(st.binary(max_size=600))
def test_image_metadata_readers_never_raise_on_garbage(data: bytes) -> None:
    feat.jpeg_texts(b"\xff\xd8" + data)
    feat.exif_texts(b"II*\x00" + data)
    feat.exif_texts(b"MM\x00*" + data)
    feat.png_texts(b"\x89PNG\r\n\x1a\n" + data)


def test_a_huge_hostile_message_is_cut_off_and_fast() -> None:
    nested = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(3000))
    words = b" ".join(b"w%d" % i for i in range(400_000))
    hostile = b"Subject: x\r\n" + b"X-H: y\r\n" * 50_000 + nested + words
    started = time.process_time()
    got = feat.extract(hostile)
    assert time.process_time() - started < 5.0
    assert b"meta:truncated" in got and len(got) <= feat.MAX_FEATURES


# ---- the model ---------------------------------------------------------------------


def _examples(bits: int = 16) -> list[tuple[list[int], int]]:
    items = read_labels(CORPUS / "labels.csv")
    return [(hash_features(feat.extract(read_message(i.path)), bits), int(i.spam)) for i in items]


def test_training_is_deterministic_and_the_file_round_trips() -> None:
    examples = _examples()
    first, second = train(examples, bits=16, epochs=2), train(examples, bits=16, epochs=2)
    blob = first.to_bytes()
    assert blob == second.to_bytes()
    loaded = Model.from_bytes(blob)
    for buckets, _ in examples[:10]:
        assert abs(loaded.logit(buckets) - first.logit(buckets)) < 0.01 * max(1.0, abs(first.logit(buckets)))
    with pytest.raises(ValueError):
        Model.from_bytes(b"not a model" + blob)


def test_the_shipped_model_is_small_and_never_saw_the_test_subset() -> None:
    from mailwarden.checks.spam.model import shipped_model_path

    assert shipped_model_path().stat().st_size < 4 * 1024 * 1024
    assert all(held_out(p.name) for p in message_files(CORPUS))


def test_learning_one_message_moves_it_and_similar_ones() -> None:
    model = load_model()
    msg = (
        b"From: Garden Club <notes@garden.test>\r\nSubject: Thursday meeting\r\n\r\n"
        b"Hi all, the garden club meets on Thursday at the community hall. Bring seeds and cuttings to swap.\r\n"
    )
    similar = msg.replace(b"Thursday meeting", b"Thursday meeting (reminder)")
    buckets, other = hash_features(feat.extract(msg)), hash_features(feat.extract(similar))
    delta: dict[int, float] = {}
    before = sigmoid(model.logit(other, delta))
    assert learn_one(model, buckets, 1, delta)
    assert sigmoid(model.logit(buckets, delta)) > 0.95
    assert sigmoid(model.logit(other, delta)) > max(0.9, before)
    assert not learn_one(model, buckets, 1, delta)  # already spam enough: nothing changes
    assert learn_one(model, buckets, 0, delta) and sigmoid(model.logit(buckets, delta)) < 0.05


def test_eval_of_the_shipped_model_on_the_held_out_subset() -> None:
    code, out, err = run_cli(
        "--dir", "/nonexistent-mailwarden", "spam", "eval", str(CORPUS), "--labels", str(CORPUS / "labels.csv")
    )
    assert code == 0, err
    figures = {line[:14].strip(): line[14:].split()[0] for line in out.splitlines()}
    assert set(figures) >= {"messages", "accuracy", "precision", "recall", "F1", "ham FP rate", "msgs/s"}
    assert figures["messages"] == "79"
    assert float(figures["accuracy"]) >= 0.95 and float(figures["F1"]) >= 0.95
    assert float(figures["ham FP rate"]) <= 0.03
    assert float(figures["msgs/s"]) > 10  # printed and sane (the bench measures it properly)


# ---- storage, the per-user model and the CLI -----------------------------------------


def test_training_events_and_weights_in_storage(tmp_path: Path) -> None:
    async def run() -> None:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        try:
            await store.add_training_event("Bob@Example.test", "spam", "quarantine_release", b"x" * 300_000)
            await store.add_training_event("bob@example.test", "ham", "imap_move", b"hello")
            with pytest.raises(StorageError):
                await store.add_training_event("bob@example.test", "maybe", "imap_move", b"x")
            pending = await store.pending_training_events(10)
            assert [(e.user, e.label, e.source) for e in pending] == [
                ("bob@example.test", "spam", "quarantine_release"),
                ("bob@example.test", "ham", "imap_move"),
            ]
            assert len(pending[0].message) == 256 * 1024  # kept no longer than the classifier reads
            await store.finish_training_events([pending[0].id], time.time())
            assert [e.label for e in await store.pending_training_events(10)] == ["ham"]
            assert await store.training_event_counts() == {
                ("bob@example.test", "spam"): (0, 1),
                ("bob@example.test", "ham"): (1, 0),
            }
            await store.spam_set_weights("bob@example.test", {7: 0.5, 9: -1.0})
            await store.spam_set_weights("bob@example.test", {9: 0.0, 11: 2.0})
            assert await store.spam_user_weights("bob@example.test") == {7: 0.5, 11: 2.0}
            assert await store.spam_user_weights("") == {}
            # Deleting the account deletes its training mail and its model.
            await store.add_domain("example.test")
            await store.add_account("bob@example.test", "x")
            await store.delete_account("bob@example.test")
            assert await store.pending_training_events(10) == []
            assert await store.spam_user_weights("bob@example.test") == {}
        finally:
            await store.close()

    asyncio.run(run())


def test_an_older_database_gains_the_spam_tables(tmp_path: Path) -> None:
    import sqlite3

    from mailwarden.storage.schema import SCHEMA_VERSION

    async def open_and(work: Any) -> Any:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        try:
            return await work(store)
        finally:
            await store.close()

    asyncio.run(open_and(lambda store: store.list_domains()))
    with sqlite3.connect(tmp_path / "db.sqlite") as db:  # back to before the spam tables (schema 6)
        db.execute("DROP TABLE training_events")
        db.execute("DROP TABLE spam_weights")
        db.execute("UPDATE schema_version SET version = 6")
    asyncio.run(open_and(lambda store: store.add_training_event("a@example.test", "spam", "cli", b"x")))
    assert len(asyncio.run(open_and(lambda store: store.pending_training_events(5)))) == 1
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)


def test_junk_labels() -> None:
    assert junk_label(None, "\\Junk") == "spam"
    assert junk_label("\\Sent", "\\Junk") == "spam"
    assert junk_label("\\Junk", None) == "ham"
    assert junk_label("\\Junk", "\\Archive") == "ham"
    assert junk_label("\\Junk", "\\Trash") is None  # deleting spam says nothing
    assert junk_label("\\Junk", "\\Junk") is None
    assert junk_label(None, "\\Archive") is None


def test_cli_train_moves_only_that_users_model(server: RunningServer) -> None:
    hard_ham = sorted((CORPUS / "hard-ham-1").iterdir())[:4]
    folder = server.paths.root / "to-train"
    folder.mkdir()
    for path in hard_ham:
        (folder / path.name).write_bytes(path.read_bytes())
    code, out, err = server.cli("spam", "train", str(folder), "--label", "spam", "--user", BOB)
    assert code == 0, err
    assert out.startswith(f"trained {BOB}'s model on 4 messages as spam")
    check = SpamCheck(load_model(), UserDeltas(server.server.store, ttl=0))

    def p(user: str, path: Path) -> float:
        r = server.call(check.check(read_message(path), "inbound", users=(user,)))
        return float(r.details["probability"])

    for path in hard_ham:
        assert p(BOB, path) > 0.9 > p(ALICE, path)
    labels = server.paths.root / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{x.name},spam\n" for x in hard_ham))
    code, out, _ = server.cli("spam", "eval", str(folder), "--labels", str(labels), "--user", BOB)
    assert code == 0 and "recall        1.0000" in out
    code, _, err = server.cli("spam", "train", str(folder), "--label", "spam", "--user", "nobody@example.test")
    assert code == 1 and "no such account" in err
    code, _, err = server.cli("spam", "train", str(folder), "--label", "maybe")
    assert code == 2


# ---- over the wire: IMAP Junk moves teach, the MX files into Junk, outbound spam is held -----

GARDEN = (
    "Hi all,\r\n\r\nThe garden club meets on Thursday evening at the community hall. Please bring seeds,\r\n"
    "cuttings and spare pots for the swap table. Tea and cake as usual; Margaret is doing the raffle.\r\n"
)


def garden_note(to: str, n: int) -> bytes:
    return (
        f"From: Garden Club <notes@garden.test>\r\nTo: {to}\r\nSubject: Club news {n}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <note{n}@garden.test>\r\n\r\n{GARDEN}"
    ).encode()


def mx_send(server: RunningServer, rcpts: list[str], data: bytes, sender: str = "notes@garden.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as c:
        c.ehlo("mx.garden.test")
        c.starttls(context=server.tls.client_context())
        c.ehlo("mx.garden.test")
        assert c.sendmail(sender, rcpts, data) == {}
    server.wait_filed()


@pytest.fixture
def checked_imap(server_factory: Any) -> RunningServer:
    """The MX checks loopback clients too; IMAP on; the learner looks for events often."""
    return server_factory(
        {"inbound.trusted_networks": [], "listen.imaps": "127.0.0.1:0", "spam.learn_interval": 0.1,
         "spam.user_model_cache_seconds": 0}
    )  # fmt: skip


def test_moving_mail_into_junk_teaches_that_users_model(checked_imap: RunningServer) -> None:
    server = checked_imap
    mx_send(server, [BOB, ALICE], garden_note("club@garden.test", 1))
    assert len(server.inbox(BOB)) == 1 and len(server.inbox(ALICE)) == 1  # the global model calls it ham
    conn = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls.client_context(), timeout=30)
    conn.login(BOB, BOB_PW)
    conn.select("INBOX")
    typ, _ = conn.uid("MOVE", "1", "Junk")
    assert typ == "OK"
    store = server.server.store
    wait_until(lambda: server.call(store.training_event_counts()).get((BOB, "spam")) == (0, 1), what="learned")

    mx_send(server, [BOB], garden_note(BOB, 2))
    mx_send(server, [ALICE], garden_note(ALICE, 3))
    assert [r[3] for r in server.inbox(BOB, "Junk")] == ["Club news 1", "Club news 2"]
    assert [r[3] for r in server.inbox(ALICE)] == ["Club news 1", "Club news 3"]

    # Out of Junk (not to Trash) is ham; Junk to Trash teaches nothing.
    conn.select("Junk")
    typ, _ = conn.uid("COPY", "2", "INBOX")
    assert typ == "OK"
    typ, _ = conn.uid("MOVE", "1", "Trash")
    assert typ == "OK"
    conn.logout()
    wait_until(lambda: server.call(store.training_event_counts()).get((BOB, "ham")) == (0, 1), what="ham learned")
    assert server.call(store.training_event_counts()).get((BOB, "spam")) == (0, 1)
    mx_send(server, [BOB], garden_note(BOB, 4))
    assert "Club news 4" in [r[3] for r in server.inbox(BOB)]


def _obvious_spam() -> bytes:
    check = SpamCheck(load_model())
    for path in sorted((CORPUS / "spam-2").iterdir()):
        data = read_message(path)
        if asyncio.run(check.check(data, "outbound")).details["probability"] > 0.999:
            return data
    raise AssertionError("no obvious spam in the subset")


def test_obvious_spam_to_the_mx_lands_in_junk_with_the_verdict_logged(
    server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailwarden")
    server = server_factory({"inbound.trusted_networks": []})
    gtube = f"From: x@spam.test\r\nTo: {BOB}\r\nSubject: test\r\n\r\nThis is the GTUBE: {GTUBE}\r\n".encode()
    mx_send(server, [BOB], gtube, sender="x@spam.test")
    mx_send(server, [BOB], _obvious_spam(), sender="x@spam.test")
    mx_send(server, [BOB], garden_note(BOB, 1))
    assert len(server.inbox(BOB, "Junk")) == 2
    assert [r[3] for r in server.inbox(BOB)] == ["Club news 1"]
    verdicts = [r.getMessage() for r in caplog.records if "event=verdict" in r.getMessage()]
    assert len(verdicts) == 3
    assert all("spam=spam" in v and "action=junk" in v for v in verdicts[:2])
    assert "spam=ham" in verdicts[2] and "action=none" in verdicts[2]


def test_inspect_explains_the_spam_probability(tmp_path: Path) -> None:
    path = tmp_path / "gtube.eml"
    path.write_bytes(f"From: x@spam.test\r\nSubject: t\r\n\r\n{GTUBE}\r\n".encode())
    code, out, err = run_cli("--dir", str(tmp_path / "none"), "inspect", str(path), "--ip", "192.0.2.1", "--json")
    assert code == 0, err
    import json

    spam = next(c for c in json.loads(out)["checks"] if c["check"] == "spam")
    assert spam["result"] == "spam" and "GTUBE" in spam["reason"]


def from_alice(message: bytes) -> bytes:
    """The message with Alice's From (submission refuses an author the user does not own)."""
    return re.sub(rb"(?im)^From:[^\r\n]*(\r\n[ \t][^\r\n]*)*", b"From: " + ALICE.encode(), message, count=1)


def test_spam_from_an_authenticated_user_is_held(server_factory: Any) -> None:
    server = with_postmaster(server_factory(HIGH_QUOTAS))
    spam = from_alice(_obvious_spam())
    with login(server) as c:
        assert c.sendmail(ALICE, ["someone@far.test"], from_alice(garden_note("friend@far.test", 1))) == {}
        assert c.sendmail(ALICE, ["victim@far.test"], spam) == {}
    found = statuses(server)
    assert found["victim@far.test"] == "held" and found["someone@far.test"] != "held"
    entry = next(e for e in server.call(server.server.store.list_queue()) if e.recipient == "victim@far.test")
    assert "spam=spam" in entry.last_error
