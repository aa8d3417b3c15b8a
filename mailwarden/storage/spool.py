"""The spool: an append-only journal with group commit.

Why a journal: a 250 reply promises the message is on disk. Writing and
fsyncing one file per message makes every session pay for its own fsync.
Here every accepted message (its envelope and its bytes, in one record with
a CRC) is appended to the current journal segment, and one `fdatasync`
makes a whole batch durable: sessions that finish DATA while a flush runs
ride on the next one (group commit). The segment's directory entry is
fsync'd when the segment is created, so a record is reachable after a crash
once its batch has flushed.

After the 250, the delivery worker files the message into mailboxes or the
outbound queue (storage/sql.py) and marks it done. A segment is deleted only
when every record in it is done *and* a checkpoint has flushed what filing
wrote (`os.sync()`), so until then the journal is the durable copy. On start,
every record still in the journal is filed again; filing is idempotent on
(queue id, account), so nothing is lost and nothing is filed twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"MWJ1"
_HEAD = struct.Struct(">4sIQI")  # magic, header length, body length, crc32
_MAX_HEADER = 16 * 1024 * 1024


def new_queue_id() -> str:
    """Sortable by time (microseconds), with 24 random bits so workers and nodes don't collide."""
    return f"{time.time_ns() // 1000:014x}{random.getrandbits(24):06x}".upper()


@dataclass(frozen=True)
class SpoolRecord:
    queue_id: str
    envelope: dict[str, Any]
    body: bytes


class SpoolWriteError(Exception):
    """The journal could not be written or flushed (disk full, I/O error)."""


def encode_record(queue_id: str, envelope: dict[str, Any], body: bytes) -> bytes:
    header = json.dumps({"qid": queue_id, **envelope}, separators=(",", ":")).encode()
    crc = zlib.crc32(body, zlib.crc32(header))
    return _HEAD.pack(MAGIC, len(header), len(body), crc) + header + body


def decode_segment(data: bytes) -> list[SpoolRecord]:
    """Every whole record, stopping at the first torn or corrupt one.

    A torn tail is a batch whose flush never finished, so none of its
    messages got a 250 and dropping it loses nothing that was acknowledged.
    """
    records: list[SpoolRecord] = []
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, hlen, blen, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        end = start + hlen + blen
        if magic != MAGIC or hlen > _MAX_HEADER or end > len(data):
            break
        header = data[start : start + hlen]
        body = data[start + hlen : end]
        if zlib.crc32(body, zlib.crc32(header)) != crc:
            break
        try:
            meta = json.loads(header)
        except ValueError:
            break
        qid = meta.pop("qid")
        records.append(SpoolRecord(qid, meta, bytes(body)))
        pos = end
    return records


@dataclass
class _Segment:
    number: int
    path: Path
    size: int = 0
    outstanding: int = 0
    fd: int | None = None


class Spool:
    def __init__(
        self,
        directory: Path,
        segment_max_bytes: int,
        group_commit_max: int,
        on_flush: Callable[[int], None] | None = None,
    ) -> None:
        self.dir = directory
        self.segment_max = segment_max_bytes
        self.group_max = group_commit_max
        self.on_flush = on_flush or (lambda n: None)
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._where: dict[str, int] = {}  # queue id -> segment number
        self._pending: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._checkpoint_lock = asyncio.Lock()
        self._writing = False  # a batch is in the writer thread
        # Its own thread: the fsync that every 250 waits for must never queue
        # behind other work in the loop's default executor (DKIM, parsing...).
        self._io = ThreadPoolExecutor(1, thread_name_prefix="spool")

    # ---- start-up -------------------------------------------------------

    def recover(self) -> list[SpoolRecord]:
        """Read every segment left by the last run; they stay until filed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        records: list[SpoolRecord] = []
        for path in sorted(self.dir.glob("seg-*.log")):
            number = int(path.stem.split("-")[1])
            found = decode_segment(path.read_bytes())
            seg = _Segment(number, path, size=path.stat().st_size, outstanding=0)
            self._segments[number] = seg
            for rec in found:
                if rec.queue_id in self._where:
                    continue  # the same message twice cannot happen, but never file it twice
                self._where[rec.queue_id] = number
                seg.outstanding += 1
                records.append(rec)
        for path in self.dir.glob("*.tmp"):
            path.unlink()
        return records

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="spool-checkpoint")

    async def stop(self) -> None:
        """Stop writing, retire what is finished, release the I/O thread."""
        for task in (self._writer, self._checkpointer):
            if task:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._active and self._active.fd is not None:
            os.close(self._active.fd)
            self._active.fd = None
        await self.checkpoint()
        self._io.shutdown(wait=True)

    # ---- the hot path ---------------------------------------------------

    async def append(self, queue_id: str, envelope: dict[str, Any], body: bytes) -> None:
        """Return once the record is durable on disk (raises SpoolWriteError)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((queue_id, encode_record(queue_id, envelope, body), fut))
        self._wake.set()
        await fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.group_max]
                del self._pending[: self.group_max]
                self._writing = True
                try:
                    seg = await asyncio.get_running_loop().run_in_executor(
                        self._io, self._write_batch, [rec for _, rec, _ in batch]
                    )
                except OSError as exc:
                    self._writing = False
                    err = SpoolWriteError(str(exc))
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
                self._writing = False
                seg.outstanding += len(batch)
                for qid, _, fut in batch:
                    self._where[qid] = seg.number
                    if not fut.done():
                        fut.set_result(None)
                self.on_flush(len(batch))

    def _write_batch(self, records: list[bytes]) -> _Segment:
        seg = self._active
        if seg is None or seg.size >= self.segment_max:
            seg = self._open_segment()
        data = b"".join(records)
        assert seg.fd is not None
        view = memoryview(data)
        while view:
            written = os.write(seg.fd, view)
            view = view[written:]
        os.fdatasync(seg.fd)
        seg.size += len(data)
        return seg

    def _open_segment(self) -> _Segment:
        if self._active is not None and self._active.fd is not None:
            os.close(self._active.fd)
            self._active.fd = None
        number = max(self._segments, default=0) + 1
        path = self.dir / f"seg-{number:012d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.dir)
        seg = _Segment(number, path, fd=fd)
        self._segments[number] = seg
        self._active = seg
        return seg

    # ---- retiring -------------------------------------------------------

    def mark_done(self, queue_id: str) -> None:
        """The message is filed; its record may go at the next checkpoint."""
        number = self._where.pop(queue_id, None)
        if number is not None:
            self._segments[number].outstanding -= 1

    def outstanding(self) -> int:
        return len(self._where) + len(self._pending)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)  # a periodic timer, not synchronisation
            await self.checkpoint()

    async def checkpoint(self) -> int:
        """Delete finished segments after flushing what filing wrote; returns how many."""
        async with self._checkpoint_lock:
            active = self._active
            if active and active.outstanding == 0 and active.size > 0 and not self._pending and not self._writing:
                # Idle: close the active segment so it can be retired.
                if active.fd is not None:
                    os.close(active.fd)
                    active.fd = None
                self._active = None
            done = [s for s in self._segments.values() if s is not self._active and s.outstanding == 0]
            if not done:
                return 0
            await asyncio.get_running_loop().run_in_executor(self._io, self._retire, [s.path for s in done])
            for s in done:
                self._segments.pop(s.number, None)
            return len(done)

    def _retire(self, paths: list[Path]) -> None:
        os.sync()  # mailbox files and the database are on disk before the journal copy goes
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        _fsync_dir(self.dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
