"""The milter codec (protocol/milter.py): round trips, hostile bytes, and the packet bound."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwarden.protocol import milter as m

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)
word = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)

replies = st.one_of(
    st.sampled_from([m.ACCEPT, m.CONTINUE, m.DISCARD, m.REJECT, m.TEMPFAIL, m.SKIP, m.PROGRESS]).map(m.Reply),
    st.builds(
        m.OptNeg,
        st.just(m.OPTNEG),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.dictionaries(st.integers(0, 6), st.lists(word, min_size=1, max_size=4).map(tuple), max_size=3),
    ),
    st.builds(
        m.ReplyCode,
        st.just(m.REPLYCODE),
        st.sampled_from([421, 450, 451, 550, 554]),
        st.just(""),
        word,
    ).map(lambda r: m.ReplyCode(r.code, r.smtp_code, f"{str(r.smtp_code)[0]}.7.1", r.text)),
    st.builds(m.HeaderChange, st.just(m.ADDHEADER), st.just(0), word, text),
    st.builds(m.HeaderChange, st.sampled_from([m.INSHEADER, m.CHGHEADER]), st.integers(0, 2**32 - 1), word, text),
    st.builds(m.Recipient, st.sampled_from([m.ADDRCPT, m.DELRCPT]), word),
    st.builds(m.Recipient, st.sampled_from([m.ADDRCPT_PAR, m.CHGFROM]), word, text),
    st.builds(m.BodyReplacement, st.just(m.REPLBODY), st.binary(max_size=300)),
    st.builds(m.Quarantine, st.just(m.QUARANTINE), word),
)


@given(st.lists(replies, max_size=8), st.data())
@settings(max_examples=300, deadline=None)
def test_replies_round_trip_in_any_chunking(events: list[m.Reply], data: st.DataObject) -> None:
    wire = b"".join(m.encode_reply(e) for e in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = m.MilterDecoder()
    out: list[m.Reply] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[start:cut])
        start = cut
    assert out == events
    assert decoder.buffered == 0


@given(st.binary(max_size=2000))
@settings(max_examples=500, deadline=None)
def test_random_bytes_raise_only_the_typed_error_and_stay_bounded(blob: bytes) -> None:
    decoder = m.MilterDecoder(max_packet=512)
    try:
        for i in range(0, len(blob), 7):
            decoder.feed(blob[i : i + 7])
            assert decoder.buffered <= 512 + 4
    except m.MilterProtocolError:
        pass


def test_an_oversized_packet_is_refused_from_its_length_alone() -> None:
    decoder = m.MilterDecoder(max_packet=1000)
    with pytest.raises(m.MilterProtocolError, match="exceeds the limit"):
        decoder.feed(struct.pack(">I", 1001) + b"b")  # nothing of the body has arrived yet
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (struct.pack(">I", 0), "length 0"),
        (m.packet(b"Z"), "unknown reply"),
        (m.packet(m.REPLYCODE, b"250 ok\x00"), "4xx or 5xx"),
        (m.packet(m.REPLYCODE, b"\xc2\xb2\xc2\xb2\xc2\xb2 x\x00"), "4xx or 5xx"),  # unicode digits are not a code
        (m.packet(m.CHGHEADER, b"\x00\x00"), "index"),
        (m.packet(m.ADDHEADER, b"only-a-name"), "2 NUL-terminated"),
        (m.packet(m.OPTNEG, b"\x00" * 11), "shorter than 12"),
        (m.packet(m.OPTNEG, b"\x00" * 12 + b"\x00\x00\x00\x01{x}"), "without NUL"),
    ],
)
def test_malformed_replies_are_clear_protocol_errors(wire: bytes, problem: str) -> None:
    with pytest.raises(m.MilterProtocolError, match=problem):
        m.MilterDecoder().feed(wire)


def test_multiline_replycode_keeps_the_code_and_joins_the_text() -> None:
    (reply,) = m.MilterDecoder().feed(m.packet(m.REPLYCODE, b"550-5.7.1 Virus found\r\n550 5.7.1 Eicar\x00"))
    assert reply == m.ReplyCode(m.REPLYCODE, 550, "5.7.1", "Virus found Eicar")


@given(text, word, st.integers(0, 65535), st.binary(max_size=200_000))
@settings(max_examples=50, deadline=None)
def test_commands_are_well_formed_packets(helo: str, addr: str, port: int, body: bytes) -> None:
    for wire in (
        m.encode_optneg(),
        m.encode_connect(helo, "192.0.2.1", port),
        m.encode_connect(helo, "2001:db8::1", port),
        m.encode_connect(helo, "", 0),
        m.encode_helo(helo),
        m.encode_mail(f"<{addr}>", ("SIZE=10",)),
        m.encode_rcpt(f"<{addr}>"),
        m.encode_header(addr, helo),
        m.encode_macros(m.CONNECT, {"j": helo, "client_addr": addr}),
        m.encode_simple(m.EOH),
    ):
        _command, data = m.decode_command(wire)
        assert len(data) + 5 == len(wire)
    chunks = m.encode_body(body)
    assert b"".join(m.decode_command(c)[1] for c in chunks) == body
    assert all(len(c) <= 5 + m.MAX_BODY_CHUNK for c in chunks)


def test_a_nul_in_a_string_is_refused_not_truncated() -> None:
    with pytest.raises(ValueError, match="NUL"):
        m.encode_helo("evil\x00injected")


header_changes = st.lists(
    st.builds(
        m.HeaderChange,
        st.sampled_from([m.ADDHEADER, m.INSHEADER, m.CHGHEADER]),
        st.integers(0, 5),
        st.text(max_size=12),
        st.text(max_size=40),
    ),
    max_size=6,
)


@given(st.binary(max_size=400), header_changes, st.booleans())
@settings(max_examples=300, deadline=None)
def test_filter_header_changes_never_smuggle_fields(message: bytes, changes: list[m.HeaderChange], lead: bool) -> None:
    """Whatever a filter sends, the result is refused (MilterFailure) or has only well-formed fields."""
    from mailwarden.checks.milter import MilterFailure, Modifications, split_message
    from mailwarden.pipeline.milters import apply_modifications

    for name, value in split_message(message)[0]:  # never raises, and what it gives can be sent
        m.encode_header(name.replace(b"\x00", b" "), value.replace(b"\x00", b" "))
    try:
        out = apply_modifications(message, Modifications(headers=changes), lead, 10_000)
    except MilterFailure:
        return
    head = out.split(b"\r\n\r\n", 1)[0]
    added = [c for c in changes if c.code != m.CHGHEADER or c.value.strip()]  # an empty change deletes
    for line in head.split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        name = line.split(b":", 1)[0]
        original = any(line in message.split(b"\r\n") for _ in [0])
        assert original or any(name == c.name.encode() for c in added), line
