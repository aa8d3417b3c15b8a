"""Prometheus metrics, one registry per server so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Counter(
            "mailwarden_smtp_connections", "SMTP connections opened", ["listener"], registry=self.registry
        )
        self.accepted = Counter(
            "mailwarden_messages_accepted", "Messages acknowledged with 250", ["listener"], registry=self.registry
        )
        self.rejected = Counter(
            "mailwarden_messages_rejected",
            "Commands or messages refused, by reason",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.queue_size = Gauge(
            "mailwarden_queue_size",
            "Recipients waiting in the outbound queue",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.spool_outstanding = Gauge(
            "mailwarden_spool_outstanding",
            "Accepted messages not yet filed",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.fsync_batch = Histogram(
            "mailwarden_fsync_batch_size",
            "Messages made durable by one spool fsync",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.check_alerts = Counter(
            "mailwarden_check_alerts",
            "Block list answers that are errors, not listings (misconfigured zone, refused resolver): fix the config",
            ["check", "zone"],
            registry=self.registry,
        )
        self.quota_exceeded = Counter(
            "mailwarden_quota_exceeded",
            "Mail refused (451 4.7.1) because a sending quota was reached",
            ["scope", "window", "unit"],
            registry=self.registry,
        )
        self.queue_delivered = Counter(
            "mailwarden_queue_delivered", "Queued recipients delivered (the remote said 250)", registry=self.registry
        )
        self.queue_deferred = Counter(
            "mailwarden_queue_deferred",
            "Delivery attempts deferred for a recipient (retried later)",
            registry=self.registry,
        )
        self.queue_bounced = Counter(
            "mailwarden_queue_bounced",
            "Queued recipients given up on (permanent failure or expiry), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.accounts_held = Counter(
            "mailwarden_accounts_held",
            "Accounts whose outbound mail was put on hold as possibly compromised, by signal",
            ["signal"],
            registry=self.registry,
        )
        self._server = None

    def serve(self, host: str, port: int) -> int:
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
