"""The mailbox store contract: special-use folders, UIDs, flags, sizes, dates, resolution."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailwarden.storage.interfaces import DeliveryBatch, LocalDelivery, RemoteDelivery, StorageError
from mailwarden.storage.sql import SqlStore


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _store(tmp_path: Path) -> SqlStore:
    store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
    await store.add_domain("example.test")
    await store.add_account("bob@example.test", "hash")
    return store


def test_new_account_has_special_use_mailboxes(tmp_path: Path) -> None:
    async def go() -> list:
        store = await _store(tmp_path)
        boxes = await store.list_mailboxes("bob@example.test")
        await store.close()
        return boxes

    boxes = run(go())
    assert [(b.name, b.special_use) for b in boxes] == [
        ("INBOX", None),
        ("Sent", "\\Sent"),
        ("Drafts", "\\Drafts"),
        ("Junk", "\\Junk"),
        ("Trash", "\\Trash"),
        ("Archive", "\\Archive"),
    ]
    assert all(b.uidvalidity > 0 and b.uidnext == 1 and b.messages == 0 for b in boxes)


def test_uids_grow_and_metadata_is_kept(tmp_path: Path) -> None:
    async def go():  # type: ignore[no-untyped-def]
        store = await _store(tmp_path)
        for i in range(3):
            data = f"From: a@b.test\r\nSubject: n{i}\r\nDate: Mon, 1 Jan 2026 00:00:0{i} +0000\r\n\r\nx\r\n".encode()
            batch = DeliveryBatch(
                local=[
                    (
                        LocalDelivery(
                            f"Q{i}", "bob@example.test", "bob@example.test", "INBOX", ("\\Seen",) if i == 0 else ()
                        ),
                        data,
                    )
                ]
            )
            await store.deliver(batch)
        msgs = await store.list_messages("bob@example.test", "INBOX")
        boxes = {b.name: b for b in await store.list_mailboxes("bob@example.test")}
        await store.close()
        return msgs, boxes

    msgs, boxes = run(go())
    assert [m.uid for m in msgs] == [1, 2, 3]
    assert [m.subject for m in msgs] == ["n0", "n1", "n2"]
    assert msgs[0].flags == ("\\Seen",) and msgs[1].flags == ()
    assert msgs[0].size == len(b"From: a@b.test\r\nSubject: n0\r\nDate: Mon, 1 Jan 2026 00:00:00 +0000\r\n\r\nx\r\n")
    assert msgs[0].internal_date > 0 and msgs[0].date.startswith("Mon, 1 Jan 2026")
    assert boxes["INBOX"].uidnext == 4 and boxes["INBOX"].messages == 3


def test_hostile_headers_do_not_break_filing(tmp_path: Path) -> None:
    async def go():  # type: ignore[no-untyped-def]
        store = await _store(tmp_path)
        data = b"From: =?utf-8?q?\xff\xfe?= <<<@@>>\r\nSubject: \x00\x01\r\n\r\n"
        await store.deliver(DeliveryBatch(local=[(LocalDelivery("Q", "bob@example.test", "bob@example.test"), data)]))
        body = await store.read_message("bob@example.test", "INBOX", 1)
        await store.close()
        return body

    assert run(go()) == b"From: =?utf-8?q?\xff\xfe?= <<<@@>>\r\nSubject: \x00\x01\r\n\r\n"


def test_resolution_rules(tmp_path: Path) -> None:
    async def go():  # type: ignore[no-untyped-def]
        store = await _store(tmp_path)
        await store.add_account("alice@example.test", "hash")
        await store.add_alias("team@example.test", "alice@example.test")
        await store.add_alias("team@example.test", "bob@example.test")
        await store.add_alias("team@example.test", "outside@far.test")
        await store.add_alias("loop1@example.test", "loop2@example.test")
        await store.add_alias("loop2@example.test", "loop1@example.test")
        out = {
            a: await store.resolve(a, "+")
            for a in (
                "Bob@Example.TEST",
                "bob+x@example.test",
                "team@example.test",
                "none@example.test",
                "x@far.test",
                "loop1@example.test",
            )
        }
        owned = await store.sender_addresses("alice@example.test")
        with pytest.raises(StorageError):
            await store.add_alias("bob@example.test", "alice@example.test")  # cannot shadow a user
        await store.close()
        return out, owned

    out, owned = run(go())
    assert out["Bob@Example.TEST"].local == ("bob@example.test",)
    assert out["bob+x@example.test"].local == ("bob@example.test",)
    assert (out["team@example.test"].local, out["team@example.test"].remote) == (
        ("alice@example.test", "bob@example.test"),
        ("outside@far.test",),
    )
    assert out["none@example.test"].kind == "unknown"
    assert out["x@far.test"].kind == "relay"
    assert out["loop1@example.test"].kind == "unknown"  # an alias loop resolves to nothing, it does not hang
    assert owned == {"alice@example.test", "team@example.test"}


def test_two_workers_filing_at_once_never_mix_up_bodies(tmp_path: Path) -> None:
    """Two processes' stores share one database: each UID's body is the message filed under it."""
    import threading

    async def setup() -> None:
        store = await _store(tmp_path)
        await store.close()

    run(setup())

    def worker(name: str) -> None:
        async def go() -> None:
            store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
            for b in range(15):
                batch = DeliveryBatch(
                    local=[
                        (
                            LocalDelivery(f"{name}{b}x{i}", "bob@example.test", "bob@example.test"),
                            f"Subject: {name}{b}x{i}\r\n\r\n".encode(),
                        )
                        for i in range(8)
                    ]
                )
                await store.deliver(batch)
            await store.close()

        asyncio.run(go())

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("A", "B", "C")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)

    async def check() -> list[tuple[str, bytes]]:
        store = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        msgs = await store.list_messages("bob@example.test", "INBOX")
        out = [(m.queue_id, await store.read_message("bob@example.test", "INBOX", m.uid)) for m in msgs]
        await store.close()
        return out

    filed = run(check())
    assert len(filed) == 3 * 15 * 8
    assert [qid for qid, body in filed if body != f"Subject: {qid}\r\n\r\n".encode()] == []


def test_small_bodies_are_rows_large_ones_files_and_a_replay_files_nothing_twice(tmp_path: Path) -> None:
    small = b"From: a@b.test\r\nSubject: small\r\n\r\n" + b"x" * 1000 + b"\r\n"
    large = b"From: a@b.test\r\nSubject: large\r\n\r\n" + (b"y" * 998 + b"\r\n") * 200  # 200 KB > INLINE_MAX

    async def go():  # type: ignore[no-untyped-def]
        store = await _store(tmp_path)
        batch = DeliveryBatch(
            local=[
                (LocalDelivery("QS", "bob@example.test", "bob@example.test"), small),
                (LocalDelivery("QL", "bob@example.test", "bob@example.test"), large),
            ],
            remote=[
                (RemoteDelivery("QR", "bob@example.test", "x@remote.test"), small),
                (RemoteDelivery("QR", "bob@example.test", "y@remote.test"), small),
                (RemoteDelivery("QB", "bob@example.test", "x@remote.test"), large),
            ],
        )
        await store.deliver(batch)
        await store.deliver(batch)  # the spool replays a batch after a crash: nothing is filed twice
        msgs = await store.list_messages("bob@example.test", "INBOX")
        bodies = [await store.read_message("bob@example.test", "INBOX", m.uid) for m in msgs]
        queue = await store.list_queue()
        queued = {e.queue_id: await store.read_blob(e.blob) for e in queue}
        files_before = sorted(p.name for p in (tmp_path / "blobs").rglob("*.eml"))
        deleted = (await store.delete_queued("QR"), await store.delete_queued("QB"))
        files_after = sorted(p.name for p in (tmp_path / "blobs").rglob("*.eml"))
        await store.close()
        return msgs, bodies, queue, queued, files_before, deleted, files_after

    msgs, bodies, queue, queued, files_before, deleted, files_after = run(go())
    assert [m.queue_id for m in msgs] == ["QS", "QL"]
    assert bodies == [small, large]
    assert sorted((e.queue_id, e.recipient) for e in queue) == [
        ("QB", "x@remote.test"),
        ("QR", "x@remote.test"),
        ("QR", "y@remote.test"),
    ]
    assert queued == {"QR": small, "QB": large}
    assert files_before == ["2.eml", "QB.eml"]  # only the large bodies are files
    assert deleted == (2, 1)
    assert files_after == ["2.eml"]


def test_a_missing_inline_body_is_a_storage_error(tmp_path: Path) -> None:
    async def go() -> None:
        store = await _store(tmp_path)
        try:
            await store.read_blob("db:mbox/1/1/404.eml")
        finally:
            await store.close()

    with pytest.raises(StorageError, match="missing"):
        run(go())


def test_imap_message_list_cache_sees_every_change_from_another_process(tmp_path: Path) -> None:
    """imap_messages caches a mailbox's list by its change count; changes made through another
    store (another worker process), by delivery, flags, expunge, or a re-created mailbox that
    reuses the id, are all seen on the next call."""

    async def go() -> None:
        one = await _store(tmp_path)
        two = await SqlStore.open_sqlite(tmp_path / "db.sqlite", tmp_path / "blobs")
        account = "bob@example.test"
        await one.imap_create_mailbox(account, "Box")
        box = await one.imap_mailbox(account, "Box")
        assert box is not None
        _, uid1 = await two.imap_append(account, "Box", b"Subject: a\r\n\r\nx\r\n", [], 1.0)
        info, msgs = await one.imap_messages(box.id)
        assert info is not None and [m.uid for m in msgs] == [uid1] and msgs[0].flags == ()
        assert (await one.imap_messages(box.id))[1] == msgs  # unchanged: the same answer again
        await two.imap_store_flags(box.id, [uid1], "+", ["\\Seen"])
        assert (await one.imap_messages(box.id))[1][0].flags == ("\\Seen",)
        _, uid2 = await two.imap_append(account, "Box", b"Subject: b\r\n\r\ny\r\n", ["\\Deleted"], 2.0)
        assert [m.uid for m in (await one.imap_messages(box.id))[1]] == [uid1, uid2]
        assert await two.imap_expunge(box.id) == [uid2]
        assert [m.uid for m in (await one.imap_messages(box.id))[1]] == [uid1]
        # This store's own STORE and APPEND patch its cached list: the same as a fresh read elsewhere.
        await one.imap_store_flags(box.id, [uid1], "+", ["\\Flagged"])
        _, uid3 = await one.imap_append(account, "Box", b"Subject: d\r\n\r\nw\r\n", ["\\Seen"], 4.0)
        patched = await one.imap_messages(box.id)
        assert patched == await two.imap_messages(box.id)
        assert [(m.uid, m.flags) for m in patched[1]] == [(uid1, ("\\Seen", "\\Flagged")), (uid3, ("\\Seen",))]
        assert patched[0] is not None and patched[0].uidnext == uid3 + 1
        await two.imap_store_flags(box.id, [uid3], "-", ["\\Seen"])  # then another store's change again
        assert (await one.imap_messages(box.id))[1][1].flags == ()
        assert await two.imap_expunge(box.id, [uid3]) == []  # not \Deleted: nothing goes
        # A delivery (the filer's path, not an imap_* method) is seen too.
        inbox = await one.imap_mailbox(account, "INBOX")
        assert inbox is not None
        assert (await one.imap_messages(inbox.id))[1] == []
        await two.deliver(DeliveryBatch(local=[(LocalDelivery("Q1", account, account), b"Subject: c\r\n\r\nz\r\n")]))
        assert len((await one.imap_messages(inbox.id))[1]) == 1
        # Deleted, then created again under the same name (SQLite may reuse the id): never the old list.
        await two.imap_delete_mailbox(account, "Box")
        assert await one.imap_messages(box.id) == (None, [])
        await two.imap_create_mailbox(account, "Box")
        again = await two.imap_mailbox(account, "Box")
        assert again is not None
        assert (await one.imap_messages(again.id))[1] == []
        await one.close()
        await two.close()

    run(go())
