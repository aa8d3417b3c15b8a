"""Assembles a running server from a Config: storage, spool, filer, listeners, metrics.

`Server.start()` recovers the spool before any listener opens, so a message
acknowledged before a crash is filed before new mail arrives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from mailwarden.config import Config
from mailwarden.endpoints.smtp import ROLES, SmtpServices, SmtpSession
from mailwarden.logs import log_event
from mailwarden.metrics import Metrics
from mailwarden.pipeline.filing import Filer
from mailwarden.security.passwords import PasswordHashing
from mailwarden.security.tls import ServerTls
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


@dataclass
class Server:
    config: Config
    paths: InstancePaths
    bound: dict[str, tuple[str, int]] = field(default_factory=dict)

    async def start(self) -> None:
        cfg = self.config
        self.metrics = Metrics()
        self.tls = ServerTls(cfg.path("tls.cert"), cfg.path("tls.key"))
        self.store = await open_store(self.paths)
        self.spool = Spool(
            self.paths.spool,
            cfg.get("queue.segment_max_bytes"),
            cfg.get("queue.group_commit_max"),
            on_flush=self.metrics.fsync_batch.observe,
        )
        self.filer = Filer(self.spool, self.store, on_filed=self._update_gauges)
        recovered = self.spool.recover()
        self.filer.start()
        for record in recovered:
            self.filer.submit(record)
        if recovered:
            log_event("spool_recovered", count=len(recovered))
            await self.filer.drained()
            await self.spool.checkpoint()
        self.spool.start()
        services = SmtpServices(cfg, self.store, make_hashing(cfg), self.spool, self.filer, self.metrics, self.tls)
        loop = asyncio.get_running_loop()
        self._servers: list[asyncio.AbstractServer] = []
        for role in ROLES:
            addr = cfg.listen(role)
            if addr is None:
                continue
            ssl_ctx = self.tls.context if role == "submissions" else None
            server = await loop.create_server(
                lambda role=role: SmtpSession(services, role, loop),
                host=addr[0],
                port=addr[1],
                ssl=ssl_ctx,
                reuse_address=True,
                backlog=512,
                ssl_handshake_timeout=30 if ssl_ctx else None,
            )
            self._servers.append(server)
            self.bound[role] = server.sockets[0].getsockname()[:2]
        metrics_addr = cfg.listen("metrics")
        if metrics_addr:
            port = self.metrics.serve(*metrics_addr)
            self.bound["metrics"] = (metrics_addr[0], port)
        self._update_gauges()
        self.paths.listeners_file.parent.mkdir(parents=True, exist_ok=True)
        self.paths.listeners_file.write_text(json.dumps({k: list(v) for k, v in self.bound.items()}))
        for name, (host, port) in self.bound.items():
            log_event("listening", listener=name, addr=f"{host}:{port}")

    def _update_gauges(self) -> None:
        self.metrics.spool_outstanding.set(self.spool.outstanding())
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
        for server in self._servers:
            await server.wait_closed()
        await self.filer.drained()
        await self.spool.stop()
        await self.spool.checkpoint()
        await self.filer.stop()
        self.metrics.stop()
        await self.store.close()
        log_event("stopped")


async def serve_forever(config: Config, paths: InstancePaths, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the TLS certificate."""
    server = Server(config, paths)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    print("event=ready " + " ".join(f"{k}={h}:{p}" for k, (h, p) in server.bound.items()), flush=True)
    if ready:
        ready.set()
    await stop.wait()
    log_event("stopping")
    await server.stop()
