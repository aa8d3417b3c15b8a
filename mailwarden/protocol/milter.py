"""The milter protocol (version 6), MTA side, without I/O.

Like h11: `encode_*` functions turn MTA commands into packet bytes, and a
`MilterDecoder` turns the filter's bytes into typed reply events. Sockets,
timeouts and the conversation's order live in checks/milter.py.

A packet is a 4-byte big-endian length (counting the command byte), one
command byte, then data. The decoder refuses a packet longer than its bound
as soon as the length is read, before buffering any of it, so a hostile or
broken filter cannot make us hold more than `max_packet` bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION = 6

# Commands, MTA -> filter (SMFIC_*).
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# Actions the filter may take (SMFIF_*), offered in OPTNEG.
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# Protocol flags (SMFIP_*): steps the filter does not want, and replies it will not send.
P_NOCONNECT = 0x01
P_NOHELO = 0x02
P_NOMAIL = 0x04
P_NORCPT = 0x08
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
# Everything we can honour; not RCPT_REJ (we never tell filters about recipients we refused) nor the MDS sizes.
OFFERED_PROTOCOL = 0x1FFFFF & ~P_RCPT_REJ

# Macro stages (SMFIM_*), as used in SETSYMLIST.
STAGE_CONNECT = 0
STAGE_HELO = 1
STAGE_ENVFROM = 2
STAGE_ENVRCPT = 3
STAGE_DATA = 4
STAGE_EOM = 5
STAGE_EOH = 6
STAGE_COMMANDS = {
    STAGE_CONNECT: CONNECT,
    STAGE_HELO: HELO,
    STAGE_ENVFROM: MAIL,
    STAGE_ENVRCPT: RCPT,
    STAGE_DATA: DATA,
    STAGE_EOM: BODYEOB,
    STAGE_EOH: EOH,
}

MAX_BODY_CHUNK = 65535  # the largest BODY packet libmilter accepts by default
DEFAULT_MAX_PACKET = 1 << 20


class MilterProtocolError(Exception):
    """The filter sent something that is not the milter protocol; the conversation cannot go on."""


# ---- encoding (MTA -> filter) ------------------------------------------------------


def packet(command: bytes, data: bytes = b"") -> bytes:
    if len(command) != 1:
        raise ValueError("a milter command is one byte")
    return struct.pack(">I", len(data) + 1) + command + data


def _z(text: str | bytes) -> bytes:
    """A NUL-terminated string; an embedded NUL would cut it short, so it is refused."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    if b"\x00" in raw:
        raise ValueError("NUL byte in a milter string")
    return raw + b"\x00"


def encode_optneg(version: int = VERSION, actions: int = ALL_ACTIONS, protocol: int = OFFERED_PROTOCOL) -> bytes:
    return packet(OPTNEG, struct.pack(">III", version, actions, protocol))


def encode_connect(hostname: str, address: str, port: int) -> bytes:
    """`address` is an IP (family 4 or 6), a socket path (family L), or "" for unknown (family U)."""
    if not address:
        return packet(CONNECT, _z(hostname) + b"U")
    if address.startswith("/"):
        return packet(CONNECT, _z(hostname) + b"L" + struct.pack(">H", 0) + _z(address))
    family = b"6" if ":" in address else b"4"
    return packet(CONNECT, _z(hostname) + family + struct.pack(">H", port & 0xFFFF) + _z(address))


def encode_helo(helo: str) -> bytes:
    return packet(HELO, _z(helo))


def encode_mail(sender: str, esmtp_args: tuple[str, ...] = ()) -> bytes:
    """`sender` with its angle brackets, as sendmail and Postfix send it ("<>" for the null sender)."""
    return packet(MAIL, b"".join(_z(a) for a in (sender, *esmtp_args)))


def encode_rcpt(rcpt: str, esmtp_args: tuple[str, ...] = ()) -> bytes:
    return packet(RCPT, b"".join(_z(a) for a in (rcpt, *esmtp_args)))


def encode_header(name: str | bytes, value: str | bytes) -> bytes:
    return packet(HEADER, _z(name) + _z(value))


def encode_body(chunk: bytes) -> list[bytes]:
    """Body bytes as BODY packets of at most MAX_BODY_CHUNK bytes each."""
    return [packet(BODY, chunk[i : i + MAX_BODY_CHUNK]) for i in range(0, len(chunk), MAX_BODY_CHUNK)]


def encode_macros(command: bytes, macros: dict[str, str]) -> bytes:
    """Macros for the next `command`; names longer than one letter go in braces ({daemon_name})."""
    data = command
    for name, value in macros.items():
        key = name if len(name) == 1 or name.startswith("{") else "{" + name + "}"
        data += _z(key) + _z(value)
    return packet(MACRO, data)


def encode_unknown(line: str) -> bytes:
    return packet(UNKNOWN, _z(line))


def encode_simple(command: bytes) -> bytes:
    """EOH, BODYEOB, DATA, ABORT, QUIT, QUIT_NC: no data."""
    return packet(command)


# ---- reply events (filter -> MTA) --------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A filter reply; `code` is the SMFIR_* byte."""

    code: bytes


@dataclass(frozen=True)
class OptNeg(Reply):
    version: int
    actions: int
    protocol: int
    symlists: dict[int, tuple[str, ...]] = field(default_factory=dict)  # stage -> macro names (SETSYMLIST)


@dataclass(frozen=True)
class ReplyCode(Reply):
    """SMFIR_REPLYCODE: a reject or tempfail with the filter's own SMTP text."""

    smtp_code: int
    enhanced: str
    text: str


@dataclass(frozen=True)
class HeaderChange(Reply):
    """ADDHEADER (index 0), INSHEADER (position) or CHGHEADER (n-th occurrence, 1-based; empty value deletes)."""

    index: int
    name: str
    value: str


@dataclass(frozen=True)
class Recipient(Reply):
    """ADDRCPT, ADDRCPT_PAR (with ESMTP args), DELRCPT or CHGFROM."""

    address: str
    args: str = ""


@dataclass(frozen=True)
class BodyReplacement(Reply):
    chunk: bytes


@dataclass(frozen=True)
class Quarantine(Reply):
    reason: str


# The decisions that end a step; PROGRESS is neither.
ACCEPT = b"a"
CONTINUE = b"c"
DISCARD = b"d"
REJECT = b"r"
TEMPFAIL = b"t"
SKIP = b"s"
CONN_FAIL = b"f"
SHUTDOWN = b"4"
PROGRESS = b"p"
REPLYCODE = b"y"
ADDHEADER = b"h"
INSHEADER = b"i"
CHGHEADER = b"m"
REPLBODY = b"b"
ADDRCPT = b"+"
ADDRCPT_PAR = b"2"
DELRCPT = b"-"
CHGFROM = b"e"
QUARANTINE = b"q"
SETSYMLIST = b"l"
FINAL = frozenset({ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, SKIP, CONN_FAIL, SHUTDOWN, REPLYCODE})
_NO_DATA = frozenset({ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, SKIP, CONN_FAIL, SHUTDOWN, PROGRESS})


def _strings(data: bytes, count: int, what: str) -> list[str]:
    """Exactly `count` NUL-terminated strings (a trailing NUL is optional on the last, as some filters omit it)."""
    parts = data.split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) < count:
        raise MilterProtocolError(f"{what}: expected {count} NUL-terminated strings")
    return [p.decode("utf-8", "replace") for p in parts[:count]]


def _decode(code: bytes, data: bytes) -> Reply:
    if code in _NO_DATA:
        return Reply(code)
    if code == OPTNEG:
        if len(data) < 12:
            raise MilterProtocolError("OPTNEG reply shorter than 12 bytes")
        version, actions, protocol = struct.unpack(">III", data[:12])
        symlists: dict[int, tuple[str, ...]] = {}
        rest = data[12:]
        while rest:
            if len(rest) < 5:
                raise MilterProtocolError("OPTNEG reply: truncated macro list")
            (stage,) = struct.unpack(">I", rest[:4])
            names, nul, rest = rest[4:].partition(b"\x00")
            if not nul:
                raise MilterProtocolError("OPTNEG reply: macro list without NUL")
            symlists[stage] = tuple(names.decode("utf-8", "replace").split())
        return OptNeg(code, version, actions, protocol, symlists)
    if code == REPLYCODE:
        (text,) = _strings(data, 1, "REPLYCODE")
        return _reply_code(text)
    if code in (INSHEADER, CHGHEADER):
        if len(data) < 4:
            raise MilterProtocolError("header change without its index")
        (index,) = struct.unpack(">I", data[:4])
        name, value = _strings(data[4:], 2, "header change")
        return HeaderChange(code, index, name, value)
    if code == ADDHEADER:
        name, value = _strings(data, 2, "ADDHEADER")
        return HeaderChange(code, 0, name, value)
    if code in (ADDRCPT, DELRCPT):
        (address,) = _strings(data, 1, "recipient")
        return Recipient(code, address)
    if code in (ADDRCPT_PAR, CHGFROM):
        parts = data.split(b"\x00")
        if len(parts) < 2 or not parts[0]:
            raise MilterProtocolError("recipient/sender change without an address")
        args = parts[1].decode("utf-8", "replace") if len(parts) > 2 else ""
        return Recipient(code, parts[0].decode("utf-8", "replace"), args)
    if code == REPLBODY:
        return BodyReplacement(code, data)
    if code == QUARANTINE:
        (reason,) = _strings(data, 1, "QUARANTINE") if data.strip(b"\x00") else [""]
        return Quarantine(code, reason)
    if code == SETSYMLIST:
        raise MilterProtocolError("SETSYMLIST outside option negotiation")
    raise MilterProtocolError(f"unknown reply command {code!r}")


def _reply_code(text: str) -> ReplyCode:
    """ "550 5.7.1 words", or a multi-line "550-5.7.1 a\\r\\n550 5.7.1 b" (texts joined by a space)."""
    code = 0
    enhanced = ""
    words: list[str] = []
    for line in text.split("\r\n"):
        head = line[:3]
        if (
            len(line) < 3
            or not (head.isascii() and head.isdigit())
            or head[0] not in "45"
            or line[3:4] not in ("", " ", "-")
        ):
            raise MilterProtocolError(f"REPLYCODE lines must start with a 4xx or 5xx code, got {line[:40]!r}")
        if code and int(head) != code:
            raise MilterProtocolError("REPLYCODE lines with different codes")
        code = int(head)
        rest = line[4:]
        first, _, after = rest.partition(" ")
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == head[0]:
            enhanced = enhanced or first
            rest = after
        if rest.strip():
            words.append(rest.strip())
    return ReplyCode(REPLYCODE, code, enhanced, " ".join(words))


class MilterDecoder:
    """Bytes from a filter in, `Reply` events out; raises `MilterProtocolError` and nothing else."""

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        events: list[Reply] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack(">I", self._buf[:4])
            if length == 0:
                raise MilterProtocolError("packet of length 0 (no command byte)")
            if length > self.max_packet:
                self._buf.clear()
                raise MilterProtocolError(f"packet of {length} bytes exceeds the limit of {self.max_packet}")
            if len(self._buf) < 4 + length:
                break
            code = bytes(self._buf[4:5])
            body = bytes(self._buf[5 : 4 + length])
            del self._buf[: 4 + length]
            events.append(_decode(code, body))
        return events


def encode_reply(reply: Reply) -> bytes:
    """The filter side of the codec: what a filter would send for `reply` (tests and test filters use it)."""
    if isinstance(reply, OptNeg):
        data = struct.pack(">III", reply.version, reply.actions, reply.protocol)
        for stage, names in reply.symlists.items():
            data += struct.pack(">I", stage) + _z(" ".join(names))
        return packet(OPTNEG, data)
    if isinstance(reply, ReplyCode):
        text = " ".join(p for p in (str(reply.smtp_code), reply.enhanced, reply.text) if p)
        return packet(REPLYCODE, _z(text))
    if isinstance(reply, HeaderChange):
        index = b"" if reply.code == ADDHEADER else struct.pack(">I", reply.index)
        return packet(reply.code, index + _z(reply.name) + _z(reply.value))
    if isinstance(reply, Recipient):
        extra = _z(reply.args) if reply.code in (ADDRCPT_PAR, CHGFROM) else b""
        return packet(reply.code, _z(reply.address) + extra)
    if isinstance(reply, BodyReplacement):
        return packet(REPLBODY, reply.chunk)
    if isinstance(reply, Quarantine):
        return packet(QUARANTINE, _z(reply.reason))
    return packet(reply.code)


def decode_command(data: bytes) -> tuple[bytes, bytes]:
    """(command, data) of one whole MTA packet; for test filters that read what we send."""
    (length,) = struct.unpack(">I", data[:4])
    if length == 0 or len(data) != 4 + length:
        raise MilterProtocolError("not exactly one packet")
    return data[4:5], data[5:]
