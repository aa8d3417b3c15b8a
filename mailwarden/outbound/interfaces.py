"""The contract between the queue and whatever carries mail out.

The queue runner (`outbound/queue_runner.py`) decides *when* and *what* to
send, and records outcomes; a `Transport` decides *how*: by MX with
STARTTLS, MTA-STS and DANE (`outbound/delivery.py`), or through a relay host
(`outbound/relay.py`). Outcomes are per recipient, because one transaction
can accept some recipients and refuse others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Status = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True)
class RecipientOutcome:
    recipient: str
    status: Status  # delivered; deferred (retry later); failed (permanent: bounce)
    code: int | None  # the remote's SMTP reply code, None if no reply (connection, TLS or policy failure)
    enhanced: str  # RFC 3463 status, e.g. "5.1.1"; ours when the remote gave none ("4.4.1" no answer...)
    text: str  # the remote's reply text, or why we did not get one; for logs, `queue show` and DSNs
    remote: str = ""  # the host that answered (name [ip]), for the DSN's Remote-MTA
    tls: str = ""  # how the session was protected, e.g. "TLSv1.3 dane" / "TLSv1.3 mta-sts" / "TLSv1.3" / ""


class Transport(Protocol):
    async def send(self, sender: str, recipients: Sequence[str], message: bytes, domain: str) -> list[RecipientOutcome]:
        """Deliver `message` for `recipients` (all in `domain`), one outcome per recipient, in order.

        Never raises for a remote problem: a refusal, a timeout, a TLS or policy
        failure are outcomes. `message` is CRLF-terminated; the transport
        dot-stuffs it and refuses (failed, 5.6.0) one with a bare CR or LF.
        """
        ...
