"""Message bodies: small ones in the database, large ones as files.

Most mail is a few KB. Creating a file per message cost ~14 % of a worker's
CPU in the kernel's inode allocator alone (perf, docs/performance.md), and
SQLite reads and writes blobs under ~100 KB faster than the file system does
(sqlite.org/intern-v-extern-blob.html). So a body up to `INLINE_MAX` bytes is
a row in `blob_data`, written in the same transaction as the mailbox or
queue row that points at it (atomic: no orphan, no dangling pointer), and its
name carries the prefix `db:`. Larger bodies are files.

File writes go to a temporary name and are renamed into place, so a reader
never sees half a message and a crash never leaves one behind. They are not
fsync'd one by one: the spool journal keeps every accepted message until a
checkpoint has flushed the files written from it (see storage/spool.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class FileBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: set[Path] = set()

    def _path(self, name: str) -> Path:
        if not _SAFE_NAME.match(name) or ".." in name.split("/"):
            raise ValueError(f"unsafe blob name {name!r}")
        return self.root / name

    def write(self, name: str, data: bytes) -> None:
        """Write a body. New names are created exclusively (callers publish them
        only afterwards, by committing the row that points at them); an existing
        name is replaced atomically."""
        path = self._path(name)
        parent = path.parent
        if parent not in self._made:
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        try:
            with open(path, "xb") as f:
                f.write(data)
            return
        except FileExistsError:
            pass
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass


INLINE_MAX = 128 * 1024  # bytes; larger bodies are files
DB_PREFIX = "db:"


def is_inline(stored: str) -> bool:
    """Whether a stored blob name refers to a `blob_data` row rather than a file."""
    return stored.startswith(DB_PREFIX)
