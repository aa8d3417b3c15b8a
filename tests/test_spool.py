"""The spool journal: what survives a torn write, and idempotent filing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailwarden.pipeline.filing import batch_for
from mailwarden.storage.spool import Spool, decode_segment, encode_record
from mailwarden.storage.sql import SqlStore


def test_torn_tail_keeps_every_whole_record() -> None:
    a = encode_record("A", {"sender": "x@y.test"}, b"first\r\n")
    b = encode_record("B", {"sender": "x@y.test"}, b"second\r\n")
    for cut in range(len(b)):
        records = decode_segment(a + b[:cut])
        assert [r.queue_id for r in records] == ["A"]
    assert [r.queue_id for r in decode_segment(a + b)] == ["A", "B"]


def test_corrupt_record_stops_recovery_there() -> None:
    a = encode_record("A", {}, b"first")
    b = bytearray(encode_record("B", {}, b"second"))
    b[-1] ^= 0xFF
    assert [r.queue_id for r in decode_segment(a + bytes(b))] == ["A"]


def test_append_is_durable_and_recovered_until_marked_done(tmp_path: Path) -> None:
    async def write() -> None:
        spool = Spool(tmp_path, 1 << 20, 64)
        spool.recover()
        spool.start()
        await asyncio.gather(*(spool.append(f"Q{i}", {"sender": ""}, b"m%d" % i) for i in range(10)))
        spool.mark_done("Q3")
        await spool.stop()  # its checkpoint keeps the segment: nine records are not filed

    asyncio.run(write())
    recovered = Spool(tmp_path, 1 << 20, 64).recover()
    assert sorted(r.queue_id for r in recovered) == sorted(f"Q{i}" for i in range(10))


def test_checkpoint_retires_segments_once_everything_is_filed(tmp_path: Path) -> None:
    async def run() -> int:
        spool = Spool(tmp_path, 1 << 20, 64)
        spool.recover()
        spool.start()
        await spool.append("Q1", {}, b"x")
        assert await spool.checkpoint() == 0  # not filed yet: kept
        spool.mark_done("Q1")
        retired = await spool.checkpoint()
        await spool.stop()
        return retired

    assert asyncio.run(run()) == 1
    assert list(tmp_path.glob("seg-*.log")) == []


def test_filing_the_same_records_twice_files_once(tmp_path: Path) -> None:
    async def run() -> list[int]:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        await store.add_domain("example.test")
        await store.add_account("bob@example.test", "x")
        recs = decode_segment(
            encode_record("Q1", {"sender": "a@b.test", "local": [["bob@example.test", "bob@example.test"]]}, b"S\r\n")
            + encode_record("Q2", {"sender": "", "remote": ["r@far.test"]}, b"T\r\n")
        )
        await store.deliver(batch_for(recs))
        await store.deliver(batch_for(recs))  # a replay after a crash
        uids = [m.uid for m in await store.list_messages("bob@example.test", "INBOX")]
        queued = await store.list_queue()
        body = await store.read_message("bob@example.test", "INBOX", 1)
        await store.close()
        assert body == b"Return-Path: <a@b.test>\r\nS\r\n"
        assert [(q.queue_id, q.recipient) for q in queued] == [("Q2", "r@far.test")]
        return uids

    assert asyncio.run(run()) == [1]
