"""Assembles a running server from a Config: storage, spool, filer, listeners, metrics.

`Server.start()` recovers the spool before any listener opens, so a message
acknowledged before a crash is filed before new mail arrives.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailwarden.checks.dnsbl import parse_zones
from mailwarden.checks.milter import parse_specs
from mailwarden.checks.rules import RulesConfig, rule_actions
from mailwarden.config import Config
from mailwarden.dns import Resolver, resolver_from_config
from mailwarden.dns.public_suffix import public_suffix_list
from mailwarden.endpoints.imap import IMAP_ROLES, ImapServices, ImapSession, MailboxHub
from mailwarden.endpoints.smtp import ROLES, InboundChecks, SmtpServices, SmtpSession
from mailwarden.logs import log_event
from mailwarden.metrics import Metrics
from mailwarden.outbound.compromise import CompromiseGuard, HoldPolicy
from mailwarden.outbound.dkim_keys import ensure_signing_keys, retire_periodically
from mailwarden.outbound.limits import LimitTable
from mailwarden.outbound.queue_runner import QueueRunner, QueueSettings
from mailwarden.outbound.quotas import Quotas
from mailwarden.outbound.transports import TransportUnavailable, transport_from_config
from mailwarden.pipeline.filing import Filer
from mailwarden.pipeline.inbound import DEFAULT_ACTIONS, InboundPolicy, inbound_content_stage, local_user_names
from mailwarden.pipeline.quarantine import digest_periodically
from mailwarden.security.guard import Guard, guard_from_config
from mailwarden.security.passwords import PasswordHashing
from mailwarden.security.tls import ServerTls
from mailwarden.storage.interfaces import StorageError
from mailwarden.storage.spool import Spool
from mailwarden.storage.sql import SqlStore


@dataclass(frozen=True)
class InstancePaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "mailwarden.toml"

    @property
    def database(self) -> Path:
        return self.root / "data" / "mailwarden.db"

    @property
    def blobs(self) -> Path:
        return self.root / "data" / "blobs"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def listeners_file(self) -> Path:
        return self.root / "run" / "listeners.json"


async def open_store(paths: InstancePaths) -> SqlStore:
    paths.database.parent.mkdir(parents=True, exist_ok=True)
    return await SqlStore.open_sqlite(paths.database, paths.blobs)


def make_hashing(config: Config) -> PasswordHashing:
    return PasswordHashing(
        config.get("accounts.hash_concurrency"),
        config.get("accounts.argon2_time_cost"),
        config.get("accounts.argon2_memory_kib"),
    )


def bind_listeners(config: Config) -> dict[str, socket.socket]:
    """Bind every configured SMTP and IMAP listener; done once, before workers fork."""
    socks: dict[str, socket.socket] = {}
    for role in ROLES + IMAP_ROLES:
        addr = config.listen(role)
        if addr is None:
            continue
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            for other in socks.values():
                other.close()
            raise OSError(exc.errno, f"cannot listen on {addr[0]}:{addr[1]} (listen.{role}): {exc.strerror}") from None
        sock.listen(512)
        sock.setblocking(False)
        socks[role] = sock
    return socks


def spool_dirs(paths: InstancePaths) -> list[Path]:
    """Every spool directory: one per worker (w0, w1, ...)."""
    if not paths.spool.exists():
        return []
    return sorted(d for d in paths.spool.iterdir() if d.is_dir() and d.name.startswith("w"))


def make_spool(config: Config, directory: Path, metrics: Metrics | None = None) -> Spool:
    return Spool(
        directory,
        config.get("queue.segment_max_bytes"),
        config.get("queue.group_commit_max"),
        on_flush=metrics.fsync_batch.observe if metrics else None,
    )


async def recover_spool(spool: Spool, filer: Filer) -> int:
    """File what a spool directory still holds (idempotently) and retire it."""
    recovered = spool.recover()
    for record in recovered:
        filer.submit(record)
    if recovered:
        await filer.drained()
        log_event("spool_recovered", dir=str(spool.dir), count=len(recovered))
    await spool.checkpoint()
    return len(recovered)


async def recover_all_spools(config: Config, paths: InstancePaths, store: SqlStore) -> int:
    """Before any listener opens: file every acknowledged message left by the last run."""
    total = 0
    for directory in spool_dirs(paths):
        spool = make_spool(config, directory)
        filer = Filer(spool, store)
        filer.start()
        try:
            total += await recover_spool(spool, filer)
        finally:
            await filer.stop()
            await spool.stop()
    return total


async def before_listening(config: Config, paths: InstancePaths, store: SqlStore) -> None:
    """Once per start, before any listener opens: recover the spools, and give every
    hosted domain its signing keys (domains from before keys existed have none)."""
    await recover_all_spools(config, paths, store)
    # No queue runner is alive yet: a row still "sending" was cut off by a crash; send it again.
    requeued = await store.requeue_sending()
    if requeued:
        log_event("queue_requeued", count=requeued, reason="start")
    made = await ensure_signing_keys(store, await store.list_domains())
    for domain, keys in made.items():
        log_event("dkim_keys_created", domain=domain, selectors=",".join(k.selector for k in keys))


def inbound_checks(config: Config, resolver: Resolver | None = None) -> InboundChecks | None:
    """The inbound check settings from config, or None when inbound.checks is off."""
    if not config.get("inbound.checks"):
        return None
    actions = dict(DEFAULT_ACTIONS)
    actions.update(rule_actions(config.get("content.attachment_action")))
    actions.update(config.get("inbound.actions"))
    policy = InboundPolicy(
        authserv_id=config.get("server.hostname"),
        actions=actions,
        junk_score=config.get("inbound.junk_score"),
        reject_score=config.get("inbound.reject_score"),
        trusted_arc_sealers=tuple(d.lower() for d in config.get("inbound.trusted_arc_sealers")),
        zones=tuple(parse_zones(config.get("dnsbl.zones"))),
        max_body_lookups=config.get("dnsbl.max_body_lookups"),
        disabled=frozenset(config.get("inbound.disabled_checks")),
        local_names=local_user_names((), config.get("content.protected_names")),
        rules=RulesConfig.from_config(config, {k: v for k, v in actions.items() if k.startswith("rules.")}),
    )
    trusted = tuple(ipaddress.ip_network(n, strict=False) for n in config.get("inbound.trusted_networks"))
    return InboundChecks(
        resolver or resolver_from_config(config),
        policy,
        trusted,
        protected_names=tuple(config.get("content.protected_names")),
    )


@dataclass
class Server:
    """One event loop's worth of server: storage, a spool, a filer and the SMTP listeners.

    Single-process (`sockets` is None): it binds its own listeners and recovers
    every spool directory first. As a worker under the supervisor, it gets
    pre-bound sockets and its own spool directory, `spool/w<worker>`.
    """

    config: Config
    paths: InstancePaths
    worker: int = 0
    sockets: dict[str, socket.socket] | None = None
    serve_metrics: bool = True
    bound: dict[str, tuple[str, int]] = field(default_factory=dict)
    _queue_gauge_at: float = field(default=float("-inf"), init=False)
    _housekeeping: asyncio.Task[None] | None = field(default=None, init=False)
    _digest: asyncio.Task[None] | None = field(default=None, init=False)  # quarantine.digest = daily
    _queue_gauge_pending: bool = field(default=False, init=False)
    queue_runner: QueueRunner | None = field(default=None, init=False)
    transport: Any = field(default=None, init=False)  # outbound/transports.py
    imap_hub: MailboxHub | None = field(default=None, init=False)  # wakes IMAP sessions (IDLE) on new mail
    _spam_learning: asyncio.Task[None] | None = field(default=None, init=False)  # checks/spam/learner.py

    async def start(self) -> None:
        cfg = self.config
        self.metrics = Metrics()
        self.tls = ServerTls(cfg.path("tls.cert"), cfg.path("tls.key"))
        self.store = await open_store(self.paths)
        standalone = self.sockets is None
        if standalone:
            await before_listening(cfg, self.paths, self.store)
        self.spool = make_spool(cfg, self.paths.spool / f"w{self.worker}", self.metrics)
        self.filer = Filer(self.spool, self.store, on_filed=self._on_filed)
        self.filer.start()
        await recover_spool(self.spool, self.filer)
        self.spool.start()
        self.resolver = resolver_from_config(cfg)
        await self._start_queue_runner(standalone)
        if self.worker == 0:  # one process does the hourly key housekeeping
            self._housekeeping = asyncio.create_task(retire_periodically(self.store), name="dkim-retire")
        inbound = inbound_checks(cfg, self.resolver)  # one resolver (and cache) for checks and delivery
        if inbound is not None:
            # The content rules compare against the hosted domains of the live directory.
            store = self.store
            inbound.content = inbound_content_stage(
                inbound.policy, self.resolver, hosted=lambda: store.directory().domains
            )
            # Build the public suffix list now, not in the first session that needs it.
            await asyncio.to_thread(public_suffix_list)
            await self._start_spam(inbound)
        services = SmtpServices(
            cfg,
            self.store,
            make_hashing(cfg),
            self.spool,
            self.filer,
            self.metrics,
            self.tls,
            inbound,
            reports=self.store,
            limits=LimitTable.from_config(cfg),
            quotas=Quotas.from_config(cfg, self.store),
            guard=CompromiseGuard(HoldPolicy.from_config(cfg), self.store),
            conn_guard=await self._start_guard(),
            milters=tuple(parse_specs(cfg.get("milter.milters"))),
        )
        if self.worker == 0 and cfg.get("quarantine.digest") == "daily":
            self._digest = asyncio.create_task(
                digest_periodically(
                    services, self.store, cfg.get("server.hostname"), cfg.get("quarantine.digest_hour")
                ),
                name="quarantine-digest",
            )
        self.imap_hub = MailboxHub()
        self.imap = imap = ImapServices(
            cfg,
            self.store,
            services.hashing,
            self.tls,
            self.metrics,
            self.imap_hub,
            services.conn_guard,
            max_message=cfg.get("smtp.max_message_size"),
        )
        loop = asyncio.get_running_loop()
        sockets = bind_listeners(cfg) if standalone else dict(self.sockets or {})
        self._servers: list[asyncio.AbstractServer] = []
        for role, sock in sockets.items():
            ssl_ctx = self.tls.context if role in ("submissions", "imaps") else None
            factory: Callable[[], asyncio.Protocol]
            if role in IMAP_ROLES:
                factory = lambda role=role: ImapSession(imap, role)  # noqa: E731
            else:
                factory = lambda role=role: SmtpSession(services, role, loop)  # noqa: E731
            server = await loop.create_server(
                factory,
                sock=sock,
                ssl=ssl_ctx,
                backlog=512,
                ssl_handshake_timeout=30 if ssl_ctx else None,
            )
            self._servers.append(server)
            self.bound[role] = sock.getsockname()[:2]
        metrics_addr = cfg.listen("metrics")
        if metrics_addr and self.serve_metrics:
            port = self.metrics.serve(*metrics_addr)
            self.bound["metrics"] = (metrics_addr[0], port)
        self._update_gauges()
        if standalone:
            write_listeners_file(self.paths, self.bound)

    async def _start_spam(self, inbound: InboundChecks) -> None:
        """The spam classifier joins the content stage; worker 0 learns from the Junk training events."""
        if "spam" in inbound.policy.disabled or inbound.content is None:
            return
        from mailwarden.checks.spam.check import spam_check_from_config
        from mailwarden.checks.spam.learner import SpamLearner

        check = await asyncio.to_thread(spam_check_from_config, self.config, self.store)
        inbound.content.add(check)
        if self.worker == 0:
            learner = SpamLearner(
                self.store,
                check.model,
                check.deltas,
                inbound.policy.authserv_id,
                interval=self.config.get("spam.learn_interval"),
                batch=self.config.get("spam.learn_batch"),
                max_bytes=self.config.get("spam.max_scan_bytes"),
            )
            self._spam_learning = asyncio.create_task(learner.run(), name="spam-learn")

    async def _start_guard(self) -> Guard:
        """The connection guard (security/guard.py), with the nftables set as its firewall hook when enabled."""
        self.conn_guard = guard_from_config(self.config, self.store, self.worker)
        try:
            from mailwarden.security.nft import NftBanSet  # written alongside; may be absent
        except ImportError:
            NftBanSet = None
        nft = NftBanSet.from_config(self.config) if NftBanSet is not None else None
        if nft is not None and self.conn_guard.bans.firewall:
            try:
                if hasattr(nft, "setup"):
                    await nft.setup()
                self.conn_guard.bans.on_ban.append(nft.add)
                self.conn_guard.bans.on_unban.append(nft.remove)
            except Exception as exc:  # bans still work without the firewall
                log_event("firewall_error", logging.ERROR, hook="setup", error=f"{type(exc).__name__}: {exc}")
        await self.conn_guard.start()
        return self.conn_guard

    async def _start_queue_runner(self, standalone: bool) -> None:
        """Every worker runs a runner (claims keep them apart), with its share of the concurrency."""
        if self.config.get("queue.paused"):
            log_event("queue_runner_disabled", logging.WARNING, reason="queue.paused is true")
            return
        try:
            self.transport = transport_from_config(self.config, self.resolver)
        except TransportUnavailable as exc:
            log_event("queue_runner_disabled", logging.WARNING, reason=str(exc))
            return
        workers = 1 if standalone else (self.config.get("server.workers") or os.cpu_count() or 1)
        self.queue_runner = QueueRunner(
            self.store,
            self.transport,
            QueueSettings.from_config(self.config, share=workers),
            worker=self.worker,
            metrics=self.metrics,
            on_change=self._update_gauges,
            wake_file=queue_wake_file(self.paths),
            on_recorded=self._count_deliveries,
        )
        await self.queue_runner.start()

    async def _count_deliveries(self, recorded: list[tuple[Any, Any, str]]) -> None:
        """Finished deliveries count towards the sending account's bounce rate (outbound/compromise.py)."""
        now = time.time()
        directory = self.store.directory()
        for row, _outcome, kind in recorded:
            if kind == "deferred" or not row.sender:
                continue
            try:
                accounts = directory.resolve(row.sender, "").local
            except StorageError:
                continue
            for account in accounts[:1]:  # the sender's own account (an alias may point elsewhere too)
                await self.store.note_delivery(account, failed=kind != "delivered", now=now)

    def _on_filed(self) -> None:
        self._update_gauges()
        if self.imap_hub is not None:
            self.imap_hub.changed()  # IDLE sessions look at their mailbox again
        if self.queue_runner is not None:
            self.queue_runner.wake()

    def _update_gauges(self) -> None:
        self.metrics.spool_outstanding.set(self.spool.outstanding())
        # A COUNT(*) after every filed batch is wasted work at hundreds of batches a
        # second: at most one a second, and one more at the end of a burst.
        if self._queue_gauge_pending:
            return
        self._queue_gauge_pending = True
        asyncio.get_running_loop().call_later(
            max(0.0, self._queue_gauge_at + 1.0 - time.monotonic()), self._start_queue_gauge_update
        )

    def _start_queue_gauge_update(self) -> None:
        self._queue_gauge_pending = False
        self._queue_gauge_at = time.monotonic()
        asyncio.get_running_loop().create_task(self._update_queue_gauge())

    async def _update_queue_gauge(self) -> None:
        try:
            self.metrics.queue_size.set(await self.store.queue_size())
        except Exception:  # a metric must never break filing
            pass

    def reload_tls(self) -> None:
        try:
            self.tls.reload()
            log_event("tls_reloaded", cert=str(self.tls.cert))
        except Exception as exc:
            log_event("tls_reload_failed", logging.ERROR, error=str(exc))

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if getattr(self, "imap", None) is not None:
            self.imap.close_all()  # IMAP sessions may idle for 30 minutes: end them
        for server in self._servers:
            await server.wait_closed()
        if getattr(self, "imap", None) is not None:
            await self.imap.wait_closed()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._digest is not None:
            self._digest.cancel()
        if self._spam_learning is not None:
            self._spam_learning.cancel()
        if getattr(self, "conn_guard", None) is not None:
            await self.conn_guard.stop()
        await self.filer.drained()
        await self.spool.stop()
        await self.filer.stop()
        if self.queue_runner is not None:
            await _bounded_step("queue_runner", self.queue_runner.stop(), 15)
        if self.transport is not None:
            await _bounded_step("transport", self.transport.close(), 10)
        self.metrics.stop()
        await self.store.close()
        log_event("stopped")


STOP_TIMEOUT = 20.0  # seconds a clean stop may take before the process exits anyway


async def _bounded_step(step: str, work: Awaitable[None], seconds: float) -> None:
    """One step of a stop that must not hold the process past `seconds`: what it leaves undone
    (a send cut off, a polite QUIT) is redone or harmless at the next start."""
    try:
        await asyncio.wait_for(work, seconds)
    except TimeoutError:
        log_event("stop_step_timeout", logging.WARNING, step=step, seconds=seconds)


def queue_wake_file(paths: InstancePaths) -> Path:
    """Touched by `queue flush` / `queue release`; every running queue runner looks at it each second."""
    return paths.root / "run" / "queue-wake"


def write_listeners_file(paths: InstancePaths, bound: dict[str, tuple[str, int]]) -> None:
    paths.listeners_file.parent.mkdir(parents=True, exist_ok=True)
    paths.listeners_file.write_text(json.dumps({k: list(v) for k, v in bound.items()}))
    for name, (host, port) in bound.items():
        log_event("listening", listener=name, addr=f"{host}:{port}")


def ready_line(bound: dict[str, tuple[str, int]]) -> str:
    """The line `serve` prints on stdout once every listener accepts connections."""
    return "event=ready " + " ".join(f"{k}={h}:{p}" for k, (h, p) in bound.items())


async def run_until_signalled(server: Server, on_ready: Callable[[], None]) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly; SIGHUP reloads the TLS certificate."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    on_ready()
    await stop.wait()
    log_event("stopping")
    # A stop never hangs the process: past the bound it exits anyway. Nothing is lost by that;
    # acknowledged mail is in the journal, which the next start files (kill -9 is the same case).
    await _bounded_step("server", server.stop(), STOP_TIMEOUT)


async def serve_forever(config: Config, paths: InstancePaths) -> None:
    """`serve` with server.workers = 1: everything in this process."""
    server = Server(config, paths)
    await server.start()
    await run_until_signalled(server, lambda: print(ready_line(server.bound), flush=True))
