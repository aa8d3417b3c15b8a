"""`serve` with several worker processes, one per core.

One Python process uses one core; Postfix uses all of them. The supervisor
binds every listener once, files whatever the last run left in any spool
directory, then forks `server.workers` workers that share the listening
sockets (the kernel hands each connection to one of them). Each worker has
its own event loop, database connection, spool directory (`spool/w<N>`)
and filer; SQLite serialises their filing transactions. The supervisor
serves the metrics (prometheus multiprocess mode), forwards SIGHUP and
SIGTERM, and restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import sys
import time

from mailwarden.config import Config
from mailwarden.logs import log_event
from mailwarden.server import (
    InstancePaths,
    Server,
    before_listening,
    bind_listeners,
    open_store,
    ready_line,
    run_until_signalled,
    write_listeners_file,
)

_PR_SET_PDEATHSIG = 1
_CONTROL_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def worker_count(config: Config) -> int:
    configured: int = config.get("server.workers")
    return configured or (os.cpu_count() or 1)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if the supervisor dies, even by kill -9."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


async def _worker_main(config: Config, paths: InstancePaths, index: int, sockets: dict[str, socket.socket]) -> None:
    server = Server(config, paths, worker=index, sockets=sockets, serve_metrics=False)
    await server.start()

    def ready() -> None:
        # Signals that arrived since the fork were held back (see Supervisor._spawn); handle them now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)
        log_event("worker_started", worker=index, pid=os.getpid())

    await run_until_signalled(server, ready)


def _run_worker(config: Config, paths: InstancePaths, index: int, sockets: dict[str, socket.socket]) -> int:
    _die_with_parent()
    # Not the supervisor's handlers: a worker's own are set up by its event loop.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    try:
        asyncio.run(_worker_main(config, paths, index, sockets))
        return 0
    except Exception as exc:
        log_event("worker_failed", worker=index, error=repr(exc))
        return 1


class Supervisor:
    def __init__(self, config: Config, paths: InstancePaths, workers: int) -> None:
        self.config = config
        self.paths = paths
        self.workers = workers
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.metrics_dir = paths.root / "run" / "metrics"

    def run(self) -> int:
        asyncio.run(self._recover())
        sockets = bind_listeners(self.config)
        self._prepare_metrics()
        for index in range(self.workers):
            self._spawn(index, sockets)
        bound = {role: sock.getsockname()[:2] for role, sock in sockets.items()}
        metrics_addr = self.config.listen("metrics")
        if metrics_addr:
            bound["metrics"] = (metrics_addr[0], self._serve_metrics(*metrics_addr))
        write_listeners_file(self.paths, bound)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        print(ready_line(bound), flush=True)
        return self._wait(sockets)

    async def _recover(self) -> None:
        store = await open_store(self.paths)
        try:
            await before_listening(self.config, self.paths, store)
        finally:
            await store.close()

    def _prepare_metrics(self) -> None:
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        from prometheus_client import values

        # Metrics made from here on, in this process and in forked workers, live in shared files.
        values.ValueClass = values.MultiProcessValue()

    def _serve_metrics(self, host: str, port: int) -> int:
        from prometheus_client import CollectorRegistry, multiprocess
        from prometheus_client.exposition import start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))
        server, _thread = start_http_server(port, addr=host, registry=registry)
        return server.server_port

    def _spawn(self, index: int, sockets: dict[str, socket.socket]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Hold control signals across the fork: the supervisor must know the
        # child before it forwards a signal to it, and the child must not die
        # of a SIGHUP that arrives before its event loop can handle it.
        signal.pthread_sigmask(signal.SIG_BLOCK, _CONTROL_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)
            raise
        if pid == 0:
            _install_uvloop()
            code = _run_worker(self.config, self.paths, index, sockets)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        self.children[pid] = index
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            _signal(pid, signal.SIGTERM)

    def _on_hup(self, signum: int, _frame: object) -> None:
        for pid in list(self.children):
            _signal(pid, signal.SIGHUP)

    def _wait(self, sockets: dict[str, socket.socket]) -> int:
        failures = 0
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            index = self.children.pop(pid, None)
            if index is None:
                continue
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, str(self.metrics_dir))
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            log_event("worker_exited", worker=index, pid=pid, code=code)
            failures += 1
            if failures > 10 * self.workers:
                log_event("giving_up", reason="workers keep dying")
                self._on_stop(signal.SIGTERM, None)
                continue
            time.sleep(min(failures, 5) * 0.2)  # back off before restarting a crashing worker
            if self.stopping:
                continue  # SIGTERM arrived during the back-off
            self._spawn(index, sockets)
        log_event("stopped")
        return 0 if self.stopping else 1


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
