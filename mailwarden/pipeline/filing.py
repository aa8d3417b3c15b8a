"""Files accepted messages: local recipients into mailboxes, remote ones into the queue.

Runs behind the spool. It takes whatever records are waiting, files them
in one transaction (storage `Delivery.deliver`), then marks them done in
the spool so their journal segment can be retired.
"""

from __future__ import annotations

import asyncio
import logging

from mailwarden.logs import log_event
from mailwarden.pipeline.headers import return_path
from mailwarden.pipeline.reports import dmarc_record
from mailwarden.storage.interfaces import Delivery, DeliveryBatch, LocalDelivery, QuarantineItem, RemoteDelivery
from mailwarden.storage.spool import Spool, SpoolRecord

_BATCH = 256


def batch_for(records: list[SpoolRecord]) -> DeliveryBatch:
    batch = DeliveryBatch()
    for rec in records:
        env = rec.envelope
        sender = env.get("sender", "")
        if env.get("dmarc"):
            batch.dmarc.append(
                dmarc_record(rec.queue_id, float(env.get("time", 0.0)), str(env.get("ip", "")), env["dmarc"])
            )
        held = env.get("quarantine")
        if held:  # the verdict quarantined it: no mailbox, no queue, until released (pipeline/quarantine.py)
            item = QuarantineItem(
                rec.queue_id,
                sender,
                tuple((str(rcpt), str(account)) for rcpt, account, *_ in env.get("local", [])),
                tuple(env.get("remote", [])),
                str(held.get("reason", "")),
                str(held.get("verdict", "")),
            )
            batch.quarantine.append((item, rec.body))
            continue
        if env.get("local"):
            local_body = return_path(sender) + rec.body
            for rcpt, account, *folder in env["local"]:
                mailbox = folder[0] if folder else "INBOX"
                batch.local.append((LocalDelivery(rec.queue_id, rcpt, account, mailbox), local_body))
        # Forwarded copies carry the ARC set the MX made for them (endpoints/smtp.py).
        remote_body = env["arc"].encode("latin-1") + rec.body if env.get("arc") else rec.body
        for rcpt in env.get("remote", []):
            batch.remote.append(
                (
                    RemoteDelivery(rec.queue_id, sender, rcpt, env.get("user") or "", env.get("hold") or ""),
                    remote_body,
                )
            )
    return batch


class Filer:
    def __init__(self, spool: Spool, store: Delivery, on_filed: callable | None = None) -> None:  # type: ignore[valid-type]
        self.spool = spool
        self.store = store
        self.on_filed = on_filed
        self._queue: asyncio.Queue[SpoolRecord] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, record: SpoolRecord) -> None:
        self._idle.clear()
        self._queue.put_nowait(record)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="filer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def drained(self) -> None:
        """Wait until everything submitted so far is filed (for shutdown and tests)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            records = [first]
            while len(records) < _BATCH and not self._queue.empty():
                records.append(self._queue.get_nowait())
            await self._file(records)
            if self._queue.empty():
                self._idle.set()

    async def _file(self, records: list[SpoolRecord]) -> None:
        delay = 1.0
        while True:
            try:
                await self.store.deliver(batch_for(records))
                break
            except Exception as exc:  # the journal still holds them; retry, never drop
                log_event("filing_error", logging.ERROR, error=repr(exc), count=len(records))
                await asyncio.sleep(delay)  # back-off before retrying storage
                delay = min(delay * 2, 60.0)
        for rec in records:
            self.spool.mark_done(rec.queue_id)
        if self.on_filed:
            self.on_filed()  # gauges first, so a reader of the log lines below sees them current
        for rec in records:
            log_event(
                "filed",
                qid=rec.queue_id,
                local=len(rec.envelope.get("local", [])),
                remote=len(rec.envelope.get("remote", [])),
            )
