"""What an attachment is, by its bytes as well as its name, and what an archive holds. No I/O.

Names lie ("invoice.pdf" that starts with MZ), so each attachment is judged
by both: the extension (including decoys like "scan.pdf.exe", names padded
with spaces or dots, and right-to-left override characters) and the magic
bytes of its content (PE/MZ, ELF, Mach-O, shebang scripts, Windows .lnk,
ISO 9660 images).

Archives are opened in memory, bounded, never extracted to disk:

* **zip** (stdlib zipfile on the decoded bytes): the encrypted flag bit of
  every member; the declared uncompressed sizes from the central directory
  are summed *before* anything is decompressed, so a bomb is recognised by
  its sizes and ratio, not by inflating it; members are then read through a
  streaming reader with a byte budget (`ArchivePolicy.max_size` in total per
  message), which is enough to look at each member's magic and to open
  nested archives up to `max_depth`.
* **gzip** and **tar**: decompressed with the same budget (gzip through a
  streaming zlib object with a `max_length`), then judged like any other
  content.
* **7z**: the end header is located from the start header; an AES-256 coder
  id there means encrypted content or headers. **RAR** 4 and 5: block/header
  flags say whether files or headers are encrypted. Their member names are not
  listed (7z headers are usually compressed and we carry no decoder), so
  they are otherwise opaque archives: a policy that must see inside can block
  them by extension or type.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field

# Extensions that run code when opened on common desktops (or mount images that do).
EXECUTABLE_EXTENSIONS = (
    "exe", "scr", "com", "pif", "cpl", "msi", "msp", "msc", "dll", "sys", "drv", "ocx",
    "js", "jse", "vbs", "vbe", "wsf", "wsh", "wsc", "ws", "sct", "bat", "cmd", "ps1", "psm1", "psd1",
    "hta", "jar", "lnk", "iso", "img", "vhd", "vhdx", "reg", "inf", "scf", "url", "application", "gadget",
    "appx", "appxbundle", "msix", "msixbundle", "chm", "hlp", "xll", "app", "command", "sh", "apk", "appref-ms",
    "settingcontent-ms", "library-ms", "search-ms", "diagcab", "cab", "one",
)  # fmt: skip
BLOCKED_TYPES = (
    "application/x-msdownload",
    "application/x-msdos-program",
    "application/x-dosexec",
    "application/x-executable",
    "application/x-ms-shortcut",
    "application/hta",
    "application/x-ms-installer",
    "application/x-msi",
    "application/vnd.microsoft.portable-executable",
    "application/javascript",
    "application/x-javascript",
    "application/x-sh",
    "application/java-archive",
    "application/x-iso9660-image",
)
ARCHIVE_EXTENSIONS = ("zip", "rar", "7z", "gz", "tgz", "tar", "bz2", "xz", "zipx", "jar")

_DECOYS = ("pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "jpg", "jpeg", "png", "gif", "txt", "rtf", "zip", "htm")
_BIDI = re.compile("[\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_LNK = b"\x4c\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
_MACHO = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
_7Z = b"7z\xbc\xaf\x27\x1c"
_7Z_AES = b"\x06\xf1\x07\x01"
_RAR4 = b"Rar!\x1a\x07\x00"
_RAR5 = b"Rar!\x1a\x07\x01\x00"
MAGIC_BYTES = 0x8006  # enough to see an ISO 9660 volume descriptor at 0x8001


@dataclass(frozen=True)
class ArchivePolicy:
    max_depth: int = 3  # archives inside archives: 1 = an archive, no archive in it
    max_size: int = 100 << 20  # uncompressed bytes per message: declared in total, and read
    max_ratio: int = 100  # a member inflating more than this (and over 1 MiB) is a bomb
    max_members: int = 1000
    extensions: frozenset[str] = frozenset(EXECUTABLE_EXTENSIONS)  # member names that count as executables


@dataclass(frozen=True)
class Finding:
    rule: str  # executable_attachment, encrypted_archive, archive_depth, archive_size
    name: str  # the attachment or member path, "a.zip/b.zip/x.exe"
    why: str


@dataclass
class _Budget:
    left: int
    findings: list[Finding] = field(default_factory=list)


def extension(name: str) -> str:
    """The last extension, lower-case, ignoring padding, trailing dots and bidi controls."""
    name = _BIDI.sub("", name).strip().rstrip(". ").lower()
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[1].strip() if "." in base else ""


def executable_name(name: str, extensions: frozenset[str] | tuple[str, ...] = EXECUTABLE_EXTENSIONS) -> str:
    """Why a file name is executable ("" if it is not): its extension, and a decoy extension before it."""
    if _BIDI.search(name):
        cleaned = _BIDI.sub("", name)
        if extension(cleaned) in extensions:
            return f"right-to-left override hides the extension .{extension(cleaned)}"
    ext = extension(name)
    if ext not in extensions:
        return ""
    stem = _BIDI.sub("", name).strip().rstrip(". ").lower().rsplit(".", 1)[0]
    decoy = stem.rsplit(".", 1)[1].strip() if "." in stem else ""
    if decoy in _DECOYS:
        return f"double extension .{decoy}.{ext}"
    return f"extension .{ext}"


def executable_content(data: bytes) -> str:
    """What executable format the bytes are ("" if none we know)."""
    if data[:2] == b"MZ":
        if len(data) >= 0x40:
            (pe,) = struct.unpack_from("<I", data, 0x3C)
            if pe + 4 <= len(data) and data[pe : pe + 4] == b"PE\0\0":
                return "Windows PE executable"
        return "DOS/Windows MZ executable"
    if data[:4] == b"\x7fELF":
        return "ELF executable"
    if data[:4] in _MACHO:
        return "Mach-O executable or Java class"
    if data[:2] == b"#!" and data[2:3] in (b"/", b" "):
        return "script with a #! interpreter line"
    if data[:20] == _LNK:
        return "Windows shortcut (.lnk)"
    if data[0x8001:0x8006] == b"CD001":
        return "ISO 9660 disk image"
    return ""


def archive_kind(data: bytes, name: str = "") -> str:
    """zip, gzip, tar, 7z, rar, or "" by magic (and by name for tar, which has no leading magic)."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:6] == _7Z:
        return "7z"
    if data[:7] == _RAR4 or data[:8] == _RAR5:
        return "rar"
    if data[257:262] == b"ustar" or extension(name) == "tar":
        return "tar"
    return ""


def inspect_content(name: str, data: bytes, policy: ArchivePolicy) -> list[Finding]:
    """Every finding about one attachment's decoded bytes (its name is judged separately)."""
    budget = _Budget(policy.max_size)
    _inspect(name, data, 0, policy, budget)
    return budget.findings


def _inspect(path: str, data: bytes, depth: int, policy: ArchivePolicy, budget: _Budget) -> None:
    what = executable_content(data)
    if what:
        budget.findings.append(Finding("executable_attachment", path, f"content is a {what}"))
        return
    kind = archive_kind(data, path)
    if not kind:
        return
    if depth >= policy.max_depth:
        budget.findings.append(
            Finding(
                "archive_depth", path, f"archives nested deeper than {policy.max_depth} ({kind} at depth {depth + 1})"
            )
        )
        return
    if kind == "zip":
        _zip(path, data, depth, policy, budget)
    elif kind == "gzip":
        inner = _gunzip(data, budget)
        if inner is None:
            budget.findings.append(Finding("archive_size", path, f"gzip inflates past {policy.max_size} bytes"))
        else:
            _inspect(path.removesuffix(".gz").removesuffix(".tgz") or path + "/-", inner, depth + 1, policy, budget)
    elif kind == "tar":
        _tar(path, data, depth, policy, budget)
    elif kind == "7z" and _sevenzip_encrypted(data):
        budget.findings.append(Finding("encrypted_archive", path, "7z archive with AES-encrypted content or headers"))
    elif kind == "rar":
        why = _rar_encrypted(data)
        if why:
            budget.findings.append(Finding("encrypted_archive", path, why))


def _member(path: str, name: str, data: bytes, depth: int, policy: ArchivePolicy, budget: _Budget) -> None:
    full = f"{path}/{name}"
    why = executable_name(name, policy.extensions)
    if why:
        budget.findings.append(Finding("executable_attachment", full, f"archive member with {why}"))
        return
    _inspect(full, data, depth + 1, policy, budget)


def _zip(path: str, data: bytes, depth: int, policy: ArchivePolicy, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError):
        return  # unreadable: nothing more to learn (a truncated zip opens nowhere else either)
    if len(infos) > policy.max_members:
        budget.findings.append(Finding("archive_size", path, f"zip with {len(infos)} members"))
        return
    declared = sum(i.file_size for i in infos)
    if declared > budget.left:
        budget.findings.append(Finding("archive_size", path, f"zip declares {declared} uncompressed bytes"))
        return
    for info in infos:
        if info.file_size > 1 << 20 and info.file_size > policy.max_ratio * max(info.compress_size, 1):
            budget.findings.append(
                Finding(
                    "archive_size",
                    f"{path}/{info.filename}",
                    f"zip member inflates {info.file_size} bytes from {info.compress_size} (a zip bomb)",
                )
            )
            return
    for info in infos:
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            budget.findings.append(Finding("encrypted_archive", path, f"zip member {info.filename} is encrypted"))
            why = executable_name(info.filename, policy.extensions)
            if why:
                budget.findings.append(
                    Finding("executable_attachment", f"{path}/{info.filename}", f"encrypted member with {why}")
                )
            continue
        if executable_name(info.filename, policy.extensions):
            _member(path, info.filename, b"", depth, policy, budget)
            continue
        member = _read_member(zf, info, budget)
        if member is None:
            budget.findings.append(Finding("archive_size", path, f"member {info.filename} exceeds the size budget"))
            return
        _member(path, info.filename, member, depth, policy, budget)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> bytes | None:
    """The member's bytes, read in chunks and never past the budget (a lying size header cannot inflate more)."""
    out = bytearray()
    try:
        with zf.open(info) as f:
            while True:
                chunk = f.read(min(65536, budget.left + 1))
                if not chunk:
                    break
                out += chunk
                budget.left -= len(chunk)
                if budget.left < 0:
                    return None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, RuntimeError, zlib.error):
        return bytes(out)  # corrupt or unsupported compression: judge what was read
    return bytes(out)


def _gunzip(data: bytes, budget: _Budget) -> bytes | None:
    """gzip decompressed through one streaming object with a byte cap; None when it would exceed the budget."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, budget.left + 1)
    except zlib.error:
        return b""
    budget.left -= len(out)
    if budget.left < 0:
        return None
    return out


def _tar(path: str, data: bytes, depth: int, policy: ArchivePolicy, budget: _Budget) -> None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for n, member in enumerate(tf):
                if n >= policy.max_members:
                    budget.findings.append(
                        Finding("archive_size", path, f"tar with more than {policy.max_members} members")
                    )
                    return
                if not member.isfile():
                    continue
                if member.size > budget.left:
                    budget.findings.append(Finding("archive_size", path, f"tar member {member.name} is too large"))
                    return
                if executable_name(member.name, policy.extensions):
                    _member(path, member.name, b"", depth, policy, budget)
                    continue
                f = tf.extractfile(member)
                content = f.read(member.size) if f is not None else b""  # bounded: member.size <= budget
                budget.left -= len(content)
                _member(path, member.name, content, depth, policy, budget)
    except (tarfile.TarError, ValueError, OSError, EOFError):
        return


def _sevenzip_encrypted(data: bytes) -> bool:
    """True when the 7z end header (start header: offset and size at bytes 12..28) names the AES coder."""
    if len(data) < 32:
        return False
    offset, size = struct.unpack_from("<QQ", data, 12)
    start = 32 + offset
    if start >= len(data) or size > 1 << 20:
        return _7Z_AES in data[-4096:]
    return _7Z_AES in data[start : start + size]


def _rar_encrypted(data: bytes) -> str:
    if data[:8] == _RAR5:
        return _rar5_encrypted(data)
    pos = 7
    for _ in range(1000):
        if pos + 7 > len(data):
            return ""
        head_type = data[pos + 2]
        (flags, head_size) = struct.unpack_from("<HH", data, pos + 3)
        if head_size < 7:
            return ""
        if head_type == 0x73 and flags & 0x0080:
            return "RAR archive with encrypted headers"
        if head_type == 0x74 and flags & 0x0004:
            return "RAR archive with a password-protected file"
        add = 0
        if flags & 0x8000 and pos + 11 <= len(data):
            (add,) = struct.unpack_from("<I", data, pos + 7)
        pos += head_size + add
    return ""


def _vint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
    raise ValueError("truncated vint")


def _rar5_encrypted(data: bytes) -> str:
    pos = 8
    try:
        for _ in range(1000):
            if pos + 4 >= len(data):
                return ""
            size, body = _vint(data, pos + 4)  # after the header CRC32
            end = body + size
            htype, p = _vint(data, body)
            if htype == 4:
                return "RAR archive with encrypted headers"
            flags, p = _vint(data, p)
            extra = data_size = 0
            if flags & 1:
                extra, p = _vint(data, p)
            if flags & 2:
                data_size, p = _vint(data, p)
            if htype == 2 and extra:
                q = end - extra
                while q < end:
                    rsize, r = _vint(data, q)
                    rtype, _ = _vint(data, r)
                    if rtype == 1:
                        return "RAR archive with a password-protected file"
                    q = r + rsize
            if size == 0 or end <= pos:
                return ""
            pos = end + data_size
    except ValueError:
        return ""
    return ""
