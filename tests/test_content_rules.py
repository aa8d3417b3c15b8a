"""The content rules (checks/rules.py): each fires on a crafted message and stays quiet on a benign twin;
archives and bombs stay bounded; the one MIME walk never raises."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import tracemalloc
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden.checks import attachments as att
from mailwarden.checks.lookalike import LookalikeDetector, distance, mixed_script
from mailwarden.checks.mime_walk import walk
from mailwarden.checks.result import Action
from mailwarden.checks.rules import RulesCheck, RulesConfig, rule_actions
from mailwarden.outbound.limits import attachment_sizes
from mailwarden.pipeline.inbound import display_name_impersonation, local_user_names
from mailwarden.pipeline.strip import strip_parts

HOSTED = {"example.test"}
CHECK = RulesCheck(RulesConfig(brand_domains=("paypal.com",)), lambda: HOSTED)


def message(
    frm: str = "Alice Sender <alice@sender.test>",
    *,
    html: str | None = None,
    attach: list[tuple[str, bytes, str]] | None = None,
    reply_to: str | None = None,
) -> bytes:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = "bob@example.test"
    m["Subject"] = "hello"
    if reply_to:
        m["Reply-To"] = reply_to
    m.set_content("Hello Bob, see below.\n")
    if html is not None:
        m.add_alternative(html, subtype="html")
    for name, data, ctype in attach or []:
        main, sub = ctype.split("/")
        m.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return m.as_bytes().replace(b"\n", b"\r\n")


def fired(data: bytes, direction: str = "inbound") -> dict[str, str]:
    return {r.result: r.reason for r in CHECK.evaluate(data, direction) if r.result != "none"}


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


PE = b"MZ" + b"\0" * 58 + (64).to_bytes(4, "little") + b"PE\0\0" + b"\0" * 200


def test_benign_message_fires_nothing() -> None:
    benign = message(
        html='<p>See <a href="https://www.sender.test/x">www.sender.test/x</a></p>',
        attach=[
            ("report.pdf", b"%PDF-1.7\n...", "application/pdf"),
            ("data.zip", zipped({"a.csv": b"1,2\n"}), "application/zip"),
        ],
        reply_to="Alice <alice@mail.sender.test>",
    )
    assert fired(benign) == {}


@pytest.mark.parametrize(
    ("author", "why"),
    [
        ("PayPal <service@paypa1.com>", "imitates paypal.com"),  # 1 for l
        ("PayPal <service@xn--pypal-4ve.com>", "mixes Latin"),  # Cyrillic a among Latin letters
        ("PayPal <service@xn--80aa0cbo65f.com>", "homograph"),  # all-Cyrillic "paypal" (no mixed script)
        ("Billing <billing@exmaple.test>", "imitates example.test (distance 1)"),  # transposition of our domain
    ],
)
def test_lookalike_from_domain(author: str, why: str) -> None:
    assert why in fired(message(author))["lookalike_domain"]


def test_lookalike_in_a_link_and_real_domains_do_not_fire() -> None:
    assert (
        "link to paypai.com" in fired(message(html='<a href="https://paypai.com/login">log in</a>'))["lookalike_domain"]
    )
    assert fired(message("PayPal <service@paypal.com>", html='<a href="https://www.paypal.com/">x</a>')) == {}
    assert fired(message("Other <x@example.org>")) == {}  # different TLD, distance 3: not a typo


def test_lookalike_helpers() -> None:
    assert distance("example", "exmaple", 2) == 1 and distance("example", "exampel", 1) == 1
    assert distance("abcdef", "uvwxyz", 2) == 3  # capped at limit + 1
    assert mixed_script("p\u0430ypal") and not mixed_script("\u0440\u0430\u0443\u0440\u0430l"[:-1])
    assert LookalikeDetector(["bank.test"]).check("bank.test") is None


def test_reply_to_mismatch_inbound_only() -> None:
    data = message(reply_to="Payments <pay@collector.test>")
    assert "pay@collector.test" in fired(data)["reply_to_mismatch"]
    assert "reply_to_mismatch" not in fired(data, "outbound")


def test_link_text_mismatch() -> None:
    bad = message(html='<a href="http://evil.test/login">https://www.example.test/login</a>')
    assert fired(bad)["link_text_mismatch"] == "link text shows example.test but goes to evil.test"
    good = message(html='<a href="https://www.example.test/login">https://example.test/login</a> <a href="x">y</a>')
    assert "link_text_mismatch" not in fired(good)


def test_display_name_spoof_of_local_users_and_our_domains() -> None:
    names = local_user_names(["john.smith@example.test", "info@example.test"], ["Jane Doe"])
    assert names == frozenset({"johnsmith", "janedoe"})  # role names are not protected
    hit = display_name_impersonation("John Smith", "freemail.test", frozenset(HOSTED), names)
    assert hit is not None and (hit.check, hit.result) == ("rules", "display_name_spoof")
    hit = display_name_impersonation("example.test IT desk", "freemail.test", frozenset(HOSTED), names)
    assert hit is not None and hit.result == "display_name_spoof"
    assert display_name_impersonation("John Smith", "example.test", frozenset(HOSTED), names) is None  # our own
    assert display_name_impersonation("Johnny Walker", "freemail.test", frozenset(HOSTED), names) is None


def test_executable_detected_by_content_with_a_harmless_name() -> None:
    reason = fired(message(attach=[("holiday.jpg", PE, "image/jpeg")]))["executable_attachment"]
    assert "holiday.jpg: content is a Windows PE executable" in reason
    for blob, what in (
        (b"\x7fELF\x02\x01\x01" + b"\0" * 50, "ELF"),
        (b"#!/bin/sh\nrm -rf ~\n", "#!"),
        (att._LNK + b"\0" * 60, ".lnk"),
        (b"\xcf\xfa\xed\xfe" + b"\0" * 40, "Mach-O"),
    ):
        assert what in fired(message(attach=[("notes.txt", blob, "text/plain")]))["executable_attachment"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("invoice.pdf.exe", "double extension .pdf.exe"),
        ("run.js", "extension .js"),
        ("setup.EXE. ", "extension .exe"),
        ("photo\u202egpj.scr", "right-to-left override"),
        ("disk.iso", "extension .iso"),
    ],
)
def test_executable_detected_by_name(name: str, why: str) -> None:
    assert (
        why in fired(message(attach=[(name, b"harmless bytes", "application/octet-stream")]))["executable_attachment"]
    )


def test_blocked_type_and_executable_inside_a_zip() -> None:
    assert "blocked_attachment" in fired(message(attach=[("a.bin", b"xx", "application/x-msdownload")]))
    reason = fired(message(attach=[("docs.zip", zipped({"readme.txt": b"hi", "sub/tool.pdf": PE}), "application/zip")]))
    assert "docs.zip/sub/tool.pdf: content is a Windows PE executable" in reason["executable_attachment"]
    named = fired(message(attach=[("docs.zip", zipped({"x.vbs": b"MsgBox 1"}), "application/zip")]))
    assert "docs.zip/x.vbs" in named["executable_attachment"]


def _encrypted_zip() -> bytes:
    """A zip whose member has the traditional-encryption flag bit set (what `zip -P` writes).

    zipfile clears the bit when writing, so it is set in the local and central headers afterwards."""
    data = bytearray(zipped({"secret.docx": b"\x12\x34" * 40}, zipfile.ZIP_STORED))
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    return bytes(data)


def test_encrypted_zip_detected() -> None:
    assert (
        "secret.docx is encrypted"
        in fired(message(attach=[("p.zip", _encrypted_zip(), "application/zip")]))["encrypted_archive"]
    )
    assert "encrypted_archive" not in fired(message(attach=[("p.zip", zipped({"a.txt": b"x"}), "application/zip")]))


@pytest.mark.skipif(shutil.which("zip") is None, reason="zip not installed")
def test_zip_dash_p_archive_detected(tmp_path: Path) -> None:
    (tmp_path / "payroll.xlsx").write_bytes(b"figures" * 100)
    subprocess.run(["zip", "-q", "-P", "s3cret", "out.zip", "payroll.xlsx"], cwd=tmp_path, check=True)
    data = (tmp_path / "out.zip").read_bytes()
    assert (
        "payroll.xlsx is encrypted"
        in fired(message(attach=[("out.zip", data, "application/zip")]))["encrypted_archive"]
    )


def test_encrypted_7z_and_rar_headers() -> None:
    # 7z: the start header points at an end header naming the AES coder (06 F1 07 01).
    end = b"\x17\x06\x01\x24\x06\xf1\x07\x01\x00"
    seven = att._7Z + b"\x00\x04" + b"\0" * 4 + (10).to_bytes(8, "little") + len(end).to_bytes(8, "little") + b"\0" * 4
    seven += b"\0" * 10 + end
    assert att._sevenzip_encrypted(seven)
    plain7 = seven.replace(att._7Z_AES, b"\x00\x00\x00\x00")
    assert not att._sevenzip_encrypted(plain7)
    # RAR 4: main header (type 0x73) with the encrypted-headers flag 0x0080.
    rar4 = att._RAR4 + b"\x00\x00\x73\x80\x00\x0d\x00" + b"\0" * 6
    assert att._rar_encrypted(rar4) == "RAR archive with encrypted headers"
    # RAR 5: an archive encryption header (type 4) first.
    rar5 = att._RAR5 + b"\0\0\0\0" + b"\x03\x04\x00\x00"
    assert att._rar_encrypted(rar5) == "RAR archive with encrypted headers"
    assert "encrypted_archive" in fired(message(attach=[("a.7z", seven, "application/x-7z-compressed")]))


def test_zip_bomb_is_recognised_without_inflating_it() -> None:
    bomb = zipped({"zeros.bin": b"\0" * (10 << 20)})
    assert len(bomb) < 64 * 1024
    data = message(attach=[("bomb.zip", bomb, "application/zip")])
    fired(message())  # the public suffix list is built once per process, not part of this measurement
    tracemalloc.start()
    started = time.monotonic()
    reason = fired(data)["archive_size"]
    elapsed = time.monotonic() - started
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "zip bomb" in reason
    assert elapsed < 2.0, elapsed  # generous for a loaded machine; ~10 ms here
    assert peak < 4 << 20, peak  # never inflated: 10 MiB would show


def test_lying_sizes_and_budget_bound_what_is_read() -> None:
    big = zipped({f"f{i}.bin": bytes([i]) * (600 << 10) for i in range(8)}, zipfile.ZIP_STORED)
    small_budget = RulesCheck(RulesConfig(archive=att.ArchivePolicy(max_size=2 << 20)), lambda: ()).evaluate(
        message(attach=[("big.zip", big, "application/zip")]), "inbound"
    )
    assert [r.result for r in small_budget] == ["archive_size"]


def test_nested_zips_five_deep_fire_archive_depth_quickly() -> None:
    inner = zipped({"a.txt": b"just text"})
    for i in range(5):
        inner = zipped({f"level{i}.zip": inner})
    started = time.monotonic()
    reason = fired(message(attach=[("nest.zip", inner, "application/zip")]))["archive_depth"]
    assert "nested deeper than 3" in reason
    assert time.monotonic() - started < 2.0
    three = zipped({"l1.zip": zipped({"l2.zip": zipped({"a.txt": b"x"})})})
    assert fired(message(attach=[("ok.zip", three, "application/zip")])) == {}


def test_gzip_with_an_executable_inside() -> None:
    import gzip

    assert "executable_attachment" in fired(message(attach=[("x.gz", gzip.compress(PE), "application/gzip")]))
    bomb = gzip.compress(b"\0" * (3 << 20))
    small = RulesCheck(RulesConfig(archive=att.ArchivePolicy(max_size=1 << 20)), lambda: ())
    assert [r.result for r in small.evaluate(message(attach=[("z.gz", bomb, "application/gzip")]), "inbound")] == [
        "archive_size"
    ]


def test_attachment_actions_follow_the_policy_and_outbound_holds() -> None:
    assert rule_actions("strip")["rules.executable_attachment"] == "none"
    assert rule_actions("quarantine")["rules.encrypted_archive"] == "quarantine"
    data = message(attach=[("run.exe", PE, "application/octet-stream")])
    (inbound,) = [r for r in CHECK.evaluate(data, "inbound") if r.result == "executable_attachment"]
    (outbound,) = [r for r in CHECK.evaluate(data, "outbound") if r.result == "executable_attachment"]
    assert inbound.action is Action.REJECT and outbound.action is Action.QUARANTINE
    assert inbound.details["parts"] and inbound.details["names"] == ["run.exe"]


def test_strip_replaces_the_part_with_a_notice_and_keeps_the_rest() -> None:
    data = message(
        attach=[("run.exe", PE, "application/octet-stream"), ("ok.pdf", b"%PDF-1.4 fine", "application/pdf")]
    )
    (hit,) = [r for r in CHECK.evaluate(data, "inbound") if r.result == "executable_attachment"]
    out, names = strip_parts(data, {i: "executable attachment" for i in hit.details["parts"]})
    assert names == ["run.exe"]
    assert b"TVqQ" not in out and b"The attachment run.exe was removed" in out
    assert b"X-Mailwarden-Stripped: run.exe" in out
    assert b"Hello Bob, see below." in out and b'filename="ok.pdf"' in out
    assert fired(out) == {}
    assert b"\r\n" in out and b"\n" not in out.replace(b"\r\n", b"")


def test_limits_use_the_bounded_walk() -> None:
    data = message(attach=[("a.bin", b"x" * 3000, "application/octet-stream")])
    ((name, size),) = attachment_sizes(data)
    assert name == '"a.bin"' and 3000 <= size <= 3100  # estimated from base64 with its line breaks
    assert attachment_sizes(b"Subject: plain\r\n\r\nbody\r\n") == []


def test_walk_caps_parts_and_depth() -> None:
    many = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\nx\r\n" * 1000 + b"--b--\r\n"
    w = walk(many, max_parts=50)
    assert w.truncated and len(w.parts) <= 50
    deep = b""
    for i in range(40):
        deep += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
    deep += b"\r\nx\r\n"
    assert walk(deep, max_depth=10).too_deep
    assert attachment_sizes(deep)[0] == ("(MIME nested too deep)", len(deep))  # size limits see it whole


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from(
                [
                    b"Content-Type: multipart/mixed; boundary=b\r\n",
                    b"--b\r\n",
                    b"--b--\r\n",
                    b"Content-Type: message/rfc822\r\n",
                    b"Content-Transfer-Encoding: base64\r\n",
                    b"Content-Disposition: attachment; filename*=utf-8''%e2%80%ae.exe\r\n",
                    b'Content-Type: text/html; charset="x-unknown"\r\n',
                    b"\r\n",
                    b"=?utf-8?q?=E2=80=AE?=\r\n",
                    b'Content-Type: application/zip; name="a.zip"\r\n\r\nUEsDBBQAAAAIAA==\r\n',
                ]
            ),
        ),
        max_size=60,
    )
)
def test_walk_and_rules_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    started = time.monotonic()
    w = walk(data, max_parts=50)
    assert len(w.parts) <= 50
    for part in w.parts:
        part.payload(1 << 20)
    attachment_sizes(data)
    CHECK.evaluate(data, "inbound")
    assert time.monotonic() - started < 5.0
