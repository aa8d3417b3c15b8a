"""The per-message data DMARC aggregate reports are built from (RFC 7489 §7.2).

Kept for every message whose DMARC record asks for reports (`rua=`):
accepted ones are filed with the message (through the spool), refused ones
are written when refused, since they never reach the spool.
"""

from __future__ import annotations

import json
from typing import Any

from mailwarden.storage.interfaces import DmarcRecord


def dmarc_record(queue_id: str, received: float, source_ip: str, details: dict[str, Any]) -> DmarcRecord:
    return DmarcRecord(
        queue_id=queue_id,
        received=received,
        source_ip=source_ip,
        header_from=str(details.get("header_from", "")),
        policy_domain=str(details.get("record_domain", "")),
        disposition=str(details.get("disposition", "none")),
        dkim_aligned=str(details.get("dkim_aligned", "fail")),
        spf_aligned=str(details.get("spf_aligned", "fail")),
        details=json.dumps(details, separators=(",", ":"), default=str),
    )
