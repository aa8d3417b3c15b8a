"""key=value logging.

The keys (event, proto, ip, user, sid, qid, reason...) are an interface:
Fail2Ban filters and dashboards match on them. Values are quoted when they
contain spaces and stripped of control characters, so a client cannot forge
a log line. Passwords never reach this module: callers pass no secret keys.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import time
from typing import Any, TextIO

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_FORBIDDEN_KEYS = frozenset({"password", "passwd", "secret", "token"})

logger = logging.getLogger("mailwarden")


def format_value(value: Any) -> str:
    text = _UNSAFE.sub("?", str(value))
    if len(text) > 300:
        text = text[:300] + "..."
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={event}"]
    for key, value in fields.items():
        if key in _FORBIDDEN_KEYS:
            raise ValueError(f"refusing to log key {key!r}")
        if value is not None:
            parts.append(f"{key}={format_value(value)}")
    line = " ".join(parts)
    stream = _direct_stream
    if stream is None:
        logger.log(level, line)
        return
    # The server logs ~5 events per message; the stdlib's LogRecord, handler and
    # formatter machinery cost ~6 % of a worker's CPU for them, so `serve` writes
    # the same line (same format as _Formatter) straight to its stream.
    with _direct_lock:
        stream.write(f"{_timestamp(int(time.time()))} level={logging.getLevelName(level).lower()} {line}\n")


_direct_stream: TextIO | None = None
_direct_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _timestamp(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{_timestamp(int(record.created))} level={record.levelname.lower()} {record.getMessage()}"


def setup_logging(level: str = "info") -> None:
    """The server's logging: everything to stderr, one key=value line per event."""
    global _direct_stream
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logger.setLevel(level.upper())
    _direct_stream = sys.stderr
    # aiosmtpd logs every command line at INFO, client bytes included; we log our own.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
