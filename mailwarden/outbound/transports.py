"""The one place that chooses how queued mail leaves: a relay host, or MX delivery.

`delivery.relay_host` set: everything goes to that smart host
(outbound/relay.py). Empty: delivery by MX with STARTTLS, MTA-STS and DANE
(outbound/delivery.py), imported only then, so a relay-only setup never
loads it.
"""

from __future__ import annotations

from typing import Any

from mailwarden.config import Config
from mailwarden.outbound.interfaces import Transport


class TransportUnavailable(Exception):
    """No transport can be built from this config; the queue keeps its mail."""


def transport_from_config(cfg: Config, resolver: Any) -> Transport:
    """The configured transport. It has an async `close()`; call it when the server stops."""
    if cfg.get("delivery.relay_host"):
        from mailwarden.outbound.relay import RelayTransport

        return RelayTransport.from_config(cfg)
    try:
        from mailwarden.outbound.delivery import MxTransport
    except ImportError as exc:
        raise TransportUnavailable(f"MX delivery is not available ({exc}); set delivery.relay_host") from None
    return MxTransport.from_config(cfg, resolver)  # type: ignore[no-any-return]
