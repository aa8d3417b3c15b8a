"""The outbound queue runner: when to send what, and what to record afterwards.

Every worker process runs one runner (the single process too). Rows are
claimed before they are sent: a claim turns them from "queued" into
"sending" with a lease, in one writing transaction, so two workers never
send the same row. Claims go by message, and a message's recipients at one
domain go out in one `Transport.send` (one SMTP transaction), at most 100
at a time. At most `queue.max_concurrent_deliveries` sends run at once
across the workers (each worker gets its share).

After an attempt each recipient's outcome is recorded in one transaction
with any DSN it causes (storage `finish_queued`):

- delivered: the row is removed (`event=delivered`);
- deferred: attempts + 1, the next attempt from `queue.retry_schedule` (the
  last delay repeats; up to 10 % jitter so retries of a burst spread out),
  and the error kept for `queue show`; past `queue.delay_warning` the sender
  gets one delay warning for that recipient;
- failed, or deferred past `queue.max_lifetime`: a DSN to the sender
  (outbound/bounces.py) and the row is removed. No DSN for a message from
  the null sender <>, ever.

Delivery is at least once. A crash (or kill -9) during a send leaves the
row "sending": at the next start, before any runner runs, every "sending"
row goes back to "queued" (no runner can be alive then), and a worker the
supervisor restarts takes back the rows its predecessor had claimed. A
lease (`LEASE_SECONDS`, longer than any send may take) is the last resort
for a runner that hangs. So a message whose send was cut off is sent once
more, and the remote may then have it twice if it had already accepted it;
it is never lost. An outcome that was recorded is never repeated.

The runner wakes when new rows are filed (`wake()`, from the server's
filer), when a send finishes, when the earliest retry falls due, at least
once a minute (`POLL_SECONDS`, which also picks up `queue flush` and
`queue release` from the CLI through the database), and within a second of
the CLI touching the wake file (`run/queue-wake`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailwarden.logs import log_event
from mailwarden.outbound.bounces import DsnRecipient, DsnReport, build_dsn, one_line, route_dsn
from mailwarden.outbound.interfaces import RecipientOutcome, Transport
from mailwarden.storage.interfaces import QueueEntry, QueueFiling, QueueUpdate, StorageError
from mailwarden.storage.spool import new_queue_id

POLL_SECONDS = 60.0  # due rows are looked for at least this often
LEASE_SECONDS = 3600.0  # a claim lapses after this; sends are cut off well before (SEND_TIMEOUT)
SEND_TIMEOUT = 1800.0  # one Transport.send may take at most this long
MAX_RECIPIENTS_PER_SEND = 100  # RFC 5321 §4.5.3.1.8: servers must take at least 100
WAKE_FILE_CHECK = 1.0  # seconds between looks at the CLI's wake file
JITTER = 0.1  # a retry delay is stretched by up to this fraction


@dataclass(frozen=True)
class QueueSettings:
    retry_schedule: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
    max_lifetime: float = 432_000.0
    delay_warning: float = 14_400.0  # 0 = never
    max_concurrent: int = 20  # this runner's share
    reporting_mta: str = "localhost"  # server.hostname
    postmaster_domain: str = "localhost"  # server.primary_domain
    recipient_delimiter: str = "+"

    @classmethod
    def from_config(cls, cfg: Any, share: int = 1) -> QueueSettings:
        """`share`: how many runners split queue.max_concurrent_deliveries (one per worker)."""
        total: int = cfg.get("queue.max_concurrent_deliveries")
        return cls(
            retry_schedule=tuple(float(s) for s in cfg.get("queue.retry_schedule")),
            max_lifetime=float(cfg.get("queue.max_lifetime")),
            delay_warning=float(cfg.get("queue.delay_warning")),
            max_concurrent=max(1, math.ceil(total / max(1, share))),
            reporting_mta=cfg.get("server.hostname"),
            postmaster_domain=cfg.get("server.primary_domain") or cfg.get("server.hostname"),
            recipient_delimiter=cfg.get("smtp.recipient_delimiter"),
        )

    def retry_delay(self, attempts: int) -> float:
        """Seconds before the next attempt, after `attempts` attempts (>= 1) so far."""
        base = self.retry_schedule[min(attempts, len(self.retry_schedule)) - 1]
        return base * (1 + random.uniform(0, JITTER))


@dataclass
class RunnerCounters:
    """What the runner did, for metrics and tests."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    warned: int = 0
    dsn_suppressed: int = 0


@dataclass
class QueueRunner:
    store: Any  # storage Queue + Accounts + read_blob (SqlStore)
    transport: Transport
    settings: QueueSettings
    worker: int = 0
    clock: Callable[[], float] = time.time
    metrics: Any = None  # mailwarden.metrics.Metrics
    on_change: Callable[[], None] | None = None  # queue size may have changed
    wake_file: Path | None = None
    # Told each recorded outcome as (row, outcome, "delivered" | "deferred" | "failed" | "expired"),
    # e.g. for the compromised-account bounce rate; its errors are logged, never fatal.
    on_recorded: Callable[[list[tuple[QueueEntry, RecipientOutcome, str]]], Awaitable[None]] | None = None
    counters: RunnerCounters = field(default_factory=RunnerCounters)

    def __post_init__(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._slots = asyncio.Semaphore(self.settings.max_concurrent)
        self._sends: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._last_lapse_check = float("-inf")

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Take back what this worker's predecessor claimed, then run."""
        taken = await self.store.requeue_sending(owner=self.worker)
        if taken:
            log_event("queue_requeued", worker=self.worker, count=taken, reason="restart")
        self._task = asyncio.create_task(self._run(), name=f"queue-runner-{self.worker}")
        if self.wake_file is not None:
            self._watcher = asyncio.create_task(self._watch_wake_file(self.wake_file), name="queue-wake-file")
        log_event("queue_runner_started", worker=self.worker, concurrency=self.settings.max_concurrent)

    async def stop(self) -> None:
        """Stop claiming, cancel sends in progress (their rows go back to "queued")."""
        tasks = [t for t in (self._task, self._watcher, *self._sends) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Rows whose sends were cut off: queued again now, not after the lease.
        try:
            await self.store.requeue_sending(owner=self.worker)
        except Exception as exc:  # the next start does it anyway
            log_event("queue_requeue_failed", logging.WARNING, error=repr(exc))

    def wake(self) -> None:
        """Look for due rows now (new mail was filed, or a send finished)."""
        self._idle.clear()
        self._wake.set()

    async def idle(self) -> None:
        """Wait until nothing is due (by this runner's clock) and no send is in progress."""
        while True:
            await self._idle.wait()
            if not self._sends and not self._wake.is_set():
                return
            await asyncio.sleep(0)

    # ---- the loop ---------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = POLL_SECONDS
            try:
                delay = await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # storage trouble: try again later, never die
                log_event("queue_error", logging.ERROR, worker=self.worker, error=repr(exc))
                delay = 5.0
            if not self._sends and not self._wake.is_set():
                self._idle.set()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _dispatch(self) -> float:
        """Claim and start what is due, as far as free slots allow; seconds until the next look."""
        now = self.clock()
        if now - self._last_lapse_check >= POLL_SECONDS:
            self._last_lapse_check = now
            lapsed = await self.store.requeue_sending(lapsed_before=now)
            if lapsed:
                log_event("queue_requeued", worker=self.worker, count=lapsed, reason="lease_lapsed")
        # A read first: most wakes (every filed batch) find nothing due, and a claim takes the write lock.
        due = await self.store.next_due()
        if due is not None and due <= now:
            while (free := self.settings.max_concurrent - len(self._sends)) > 0:
                rows = await self.store.claim_due(now, free, now + LEASE_SECONDS, self.worker)
                if not rows:
                    break
                for group in _groups(rows):
                    task = asyncio.create_task(self._attempt(group))
                    self._sends.add(task)
                    task.add_done_callback(self._send_done)
            if len(self._sends) >= self.settings.max_concurrent:
                return POLL_SECONDS  # a finishing send wakes us
            due = await self.store.next_due()
        if due is None:
            return POLL_SECONDS
        return min(POLL_SECONDS, max(0.0, due - self.clock()))

    def _send_done(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log_event("queue_error", logging.ERROR, worker=self.worker, error=repr(task.exception()))
        self.wake()

    async def _watch_wake_file(self, path: Path) -> None:
        """`queue flush` / `queue release` touch this file; a stat a second costs nothing."""

        def mtime() -> float:
            try:
                return path.stat().st_mtime
            except OSError:
                return 0.0

        seen = mtime()
        while True:
            await asyncio.sleep(WAKE_FILE_CHECK)  # a poll interval, not synchronisation
            current = mtime()
            if current != seen:
                seen = current
                self.wake()

    # ---- one attempt --------------------------------------------------------

    async def _attempt(self, rows: list[QueueEntry]) -> None:
        first = rows[0]
        async with self._slots:
            try:
                body = await self.store.read_blob(first.blob)
            except (StorageError, OSError) as exc:
                # No body: nothing can ever be sent. Bounce without quoting it.
                log_event("queue_body_missing", logging.ERROR, qid=first.queue_id, error=repr(exc))
                body = b""
                text = "the queued message body is missing"
                outcomes = [RecipientOutcome(r.recipient, "failed", None, "5.3.0", text) for r in rows]
            else:
                outcomes = await self._send(first.sender, [r.recipient for r in rows], body, first.domain)
            await self._record(rows, outcomes, body)

    async def _send(self, sender: str, recipients: list[str], body: bytes, domain: str) -> list[RecipientOutcome]:
        try:
            outcomes = await asyncio.wait_for(self.transport.send(sender, recipients, body, domain), SEND_TIMEOUT)
        except TimeoutError:
            text = f"delivery attempt took longer than {SEND_TIMEOUT:.0f} s"
            return [RecipientOutcome(r, "deferred", None, "4.4.7", text) for r in recipients]
        except Exception as exc:  # a transport bug must not lose mail: retry later
            log_event("transport_error", logging.ERROR, domain=domain, error=repr(exc))
            text = f"internal error in the transport: {type(exc).__name__}"
            return [RecipientOutcome(r, "deferred", None, "4.3.0", text) for r in recipients]
        by_rcpt = {o.recipient: o for o in outcomes}
        missing = "the transport returned no outcome for this recipient"
        return [by_rcpt.get(r) or RecipientOutcome(r, "deferred", None, "4.3.0", missing) for r in recipients]

    async def _record(self, rows: list[QueueEntry], outcomes: Sequence[RecipientOutcome], body: bytes) -> None:
        now = self.clock()
        s = self.settings
        updates: list[QueueUpdate] = []
        bounced: list[tuple[QueueEntry, RecipientOutcome]] = []
        warn: list[tuple[QueueEntry, RecipientOutcome]] = []
        expired_ids: set[int] = set()
        for row, out in zip(rows, outcomes, strict=True):
            if out.status == "delivered":
                updates.append(QueueUpdate(row.id, remove=True))
                continue
            error = _error_text(out)
            if out.status == "failed":
                updates.append(QueueUpdate(row.id, remove=True))
                bounced.append((row, out))
                continue
            if now - row.created >= s.max_lifetime:
                updates.append(QueueUpdate(row.id, remove=True))
                bounced.append((row, out))
                expired_ids.add(row.id)
                continue
            due_warning = s.delay_warning > 0 and not row.warned and now - row.created >= s.delay_warning
            updates.append(
                QueueUpdate(
                    row.id,
                    remove=False,
                    next_attempt=now + s.retry_delay(row.attempts + 1),
                    last_error=error,
                    warned=due_warning,
                )
            )
            if due_warning:
                warn.append((row, out))
        filings: list[QueueFiling] = []
        dsn_ids: dict[str, str] = {}
        for action, items in (("failed", bounced), ("delayed", warn)):
            if not items:
                continue
            filing, dsn_qid = await self._dsn(action, items, body, now, expired_ids)
            if filing is not None:
                filings.append(filing)
            dsn_ids[action] = dsn_qid
        await self._finish(updates, filings)
        self._account(rows, outcomes, updates, expired_ids, dsn_ids)
        if self.on_change is not None:
            self.on_change()
        if self.on_recorded is not None:
            kinds = [
                o.status if o.status != "deferred" or not u.remove else "expired"
                for o, u in zip(outcomes, updates, strict=True)
            ]
            try:
                await self.on_recorded(list(zip(rows, outcomes, kinds, strict=True)))
            except Exception as exc:
                log_event("queue_hook_error", logging.WARNING, error=repr(exc))

    async def _finish(self, updates: list[QueueUpdate], filings: list[QueueFiling]) -> None:
        """Record outcomes, retrying storage errors for a while: an unrecorded outcome means
        the rows stay "sending" until restart or lease lapse, and are then sent again."""
        delay = 0.5
        for attempt in range(6):
            try:
                await self.store.finish_queued(updates, filings)
                return
            except Exception as exc:
                log_event("queue_record_error", logging.ERROR, attempt=attempt + 1, error=repr(exc))
                if attempt == 5:
                    raise
                await asyncio.sleep(delay)  # back-off before retrying storage
                delay *= 2

    async def _dsn(
        self,
        action: str,
        items: list[tuple[QueueEntry, RecipientOutcome]],
        body: bytes,
        now: float,
        expired_ids: set[int],
    ) -> tuple[QueueFiling | None, str]:
        """The DSN for `items` (rows of one message), routed to its sender; (None, reason) if none is sent."""
        first = items[0][0]
        if not first.sender:
            self.counters.dsn_suppressed += 1
            log_event("dsn_suppressed", qid=first.queue_id, action=action, reason="null_sender")
            return None, "none"
        report = DsnReport(
            action="failed" if action == "failed" else "delayed",
            queue_id=first.queue_id,
            sender=first.sender,
            arrival=first.created,
            recipients=[
                DsnRecipient(row.recipient, out.enhanced, out.code, out.text, out.remote, now) for row, out in items
            ],
            will_retry_until=first.created + self.settings.max_lifetime if action == "delayed" else None,
            expired=any(row.id in expired_ids for row, _ in items),
        )
        dsn = build_dsn(
            report,
            body,
            reporting_mta=self.settings.reporting_mta,
            postmaster_domain=self.settings.postmaster_domain,
            now=now,
        )
        resolution = await self.store.resolve(first.sender, self.settings.recipient_delimiter)
        dsn_qid = new_queue_id()
        batch = route_dsn(resolution, dsn_qid, first.sender, dsn)
        if batch is None:
            log_event(
                "dsn_undeliverable", qid=first.queue_id, action=action, sender=first.sender, reason=resolution.kind
            )
            return None, "none"
        return QueueFiling(tuple(row.id for row, _ in items), batch), dsn_qid

    def _account(
        self,
        rows: list[QueueEntry],
        outcomes: Sequence[RecipientOutcome],
        updates: list[QueueUpdate],
        expired_ids: set[int],
        dsn_ids: dict[str, str],
    ) -> None:
        m = self.metrics
        for row, out, upd in zip(rows, outcomes, updates, strict=True):
            if out.status == "delivered":
                self.counters.delivered += 1
                if m is not None:
                    m.queue_delivered.inc()
                log_event("delivered", qid=row.queue_id, rcpt=row.recipient, remote=out.remote, tls=out.tls or "none")
            elif upd.remove:
                reason = "expired" if row.id in expired_ids else "failed"
                self.counters.bounced += 1
                if m is not None:
                    m.queue_bounced.labels(reason).inc()
                log_event(
                    "bounced",
                    qid=row.queue_id,
                    rcpt=row.recipient,
                    reason=reason,
                    status=out.enhanced,
                    code=out.code,
                    error=one_line(out.text, 300),
                    dsn=dsn_ids.get("failed", "none"),
                )
            else:
                self.counters.deferred += 1
                if m is not None:
                    m.queue_deferred.inc()
                log_event(
                    "deferred",
                    qid=row.queue_id,
                    rcpt=row.recipient,
                    attempts=row.attempts + 1,
                    retry_in=f"{upd.next_attempt - self.clock():.0f}",
                    status=out.enhanced,
                    code=out.code,
                    error=one_line(out.text, 300),
                )
                if upd.warned:
                    self.counters.warned += 1
                    log_event("delay_warning", qid=row.queue_id, rcpt=row.recipient, dsn=dsn_ids.get("delayed", "none"))


def _groups(rows: list[QueueEntry]) -> list[list[QueueEntry]]:
    """A message's recipients at one domain, in order, at most MAX_RECIPIENTS_PER_SEND each."""
    by_key: dict[tuple[str, str], list[QueueEntry]] = {}
    for row in rows:
        by_key.setdefault((row.queue_id, row.domain), []).append(row)
    groups: list[list[QueueEntry]] = []
    for members in by_key.values():
        for i in range(0, len(members), MAX_RECIPIENTS_PER_SEND):
            groups.append(members[i : i + MAX_RECIPIENTS_PER_SEND])
    return groups


def _error_text(out: RecipientOutcome) -> str:
    """What `queue show` prints as the last error."""
    code = f"{out.code} " if out.code is not None else ""
    status = "" if out.text.startswith(out.enhanced) else f"{out.enhanced} "
    where = f" (from {out.remote})" if out.remote else ""
    return one_line(f"{code}{status}{out.text}{where}", 1000)
