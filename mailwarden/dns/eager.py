"""`gather` that starts each coroutine at once and makes a Task only for those that must wait.

The checks fan out into many small lookups (each block list zone, each
DKIM key, the four data-stage checks), and nearly all of them are answered
from the resolver's cache without ever suspending. `asyncio.gather` wraps
every one in a Task and a trip round the event loop; at ~25 µs each that was
a measurable part of a message's CPU. This is Python 3.12's eager task
factory for one call site: each coroutine runs synchronously up to its first
real suspension, a finished one costs nothing more, and only one that is
waiting (a cache miss) is handed to a Task, so misses still run concurrently.
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


async def gather(*coros: Coroutine[Any, Any, T]) -> list[T]:
    """Like `asyncio.gather(*coros)` (results in order, the first exception propagates)."""
    results: list[Any] = [None] * len(coros)
    waiting: list[tuple[int, asyncio.Future[Any]]] = []
    error: BaseException | None = None
    for i, coro in enumerate(coros):
        if error is not None:
            coro.close()  # never started: no "was never awaited" warning
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            results[i] = done.value
        except BaseException as exc:
            error = exc
        else:
            task = asyncio.ensure_future(_resume(coro, yielded))
            task.add_done_callback(functools.partial(_settle, coro))
            waiting.append((i, task))
    if error is not None:
        for _, task in waiting:
            task.cancel()
        if waiting:
            await asyncio.gather(*(t for _, t in waiting), return_exceptions=True)
        raise error
    if waiting:
        for (i, _), value in zip(waiting, await asyncio.gather(*(t for _, t in waiting)), strict=True):
            results[i] = value
    return results


def _settle(coro: Coroutine[Any, Any, Any], task: asyncio.Future[Any]) -> None:
    """A Task cancelled before its first step never resumed `coro`: deliver the cancellation.

    The coroutine then runs its own handlers (an `Event.wait` removes its
    waiter); one that tries to wait again is closed.
    """
    if coro.cr_frame is None or not task.cancelled():
        return
    try:
        coro.throw(asyncio.CancelledError())
    except (asyncio.CancelledError, StopIteration):
        return
    except Exception:  # the caller was cancelled; nobody is left to see this
        return
    coro.close()


async def _resume(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    return await _continue(coro, yielded)


@types.coroutine
def _continue(coro: Coroutine[Any, Any, T], yielded: Any) -> Generator[Any, Any, T]:
    """Drive a coroutine that already ran to its first suspension, from inside a Task.

    What it yielded (a future with `_asyncio_future_blocking` set) goes to the
    Task, which wakes us when it is done; what the Task sends or throws is
    passed on, exactly as if the Task had started the coroutine itself.
    """
    while True:
        try:
            try:
                sent = yield yielded
            except BaseException as exc:
                yielded = coro.throw(exc)
            else:
                yielded = coro.send(sent)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
