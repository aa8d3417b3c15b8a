"""Where a check's CPU-bound work runs: inline for ordinary mail, a worker thread for big mail.

A thread hand-off costs more than verifying a DKIM signature on a few KB
(the GIL makes the two take turns anyway), but on a large message the work
would stall every other session on this event loop. Below the limit the work
is bounded (linear in the message size), so it runs inline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

INLINE_LIMIT = 64 * 1024  # bytes of message

T = TypeVar("T")


async def run_cpu_bound(size: int, fn: Callable[[], T]) -> T:
    if size <= INLINE_LIMIT:
        return fn()
    return await asyncio.to_thread(fn)
