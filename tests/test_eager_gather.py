"""dns/eager.gather: asyncio.gather's results and errors, without a Task for work that never waits."""

from __future__ import annotations

import asyncio

import pytest

from mailwarden.dns import eager


async def immediate(value: int) -> int:
    return value


async def waits(event: asyncio.Event, value: int) -> int:
    await event.wait()
    return value


async def test_results_keep_order_whether_or_not_they_waited() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_soon(event.set)
    assert await eager.gather(immediate(1), waits(event, 2), immediate(3)) == [1, 2, 3]


async def test_only_waiting_coroutines_become_tasks() -> None:
    before = len(asyncio.all_tasks())
    seen: list[int] = []

    async def count_tasks() -> int:
        seen.append(len(asyncio.all_tasks()))
        return 0

    await eager.gather(count_tasks(), immediate(1))
    assert seen == [before]  # ran inside the caller's task


async def test_an_immediate_error_propagates_and_cancels_the_waiting() -> None:
    event = asyncio.Event()
    cancelled = asyncio.Event()

    async def waits_forever() -> int:
        try:
            await event.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async def fails() -> int:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await eager.gather(waits_forever(), fails(), immediate(1))
    assert cancelled.is_set()


async def test_an_error_after_waiting_propagates() -> None:
    async def fails_later() -> int:
        await asyncio.sleep(0)
        raise KeyError("later")

    with pytest.raises(KeyError):
        await eager.gather(immediate(1), fails_later())


async def test_cancelling_the_caller_reaches_the_waiting_coroutine() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def waits_forever() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    task = asyncio.ensure_future(eager.gather(waits_forever()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


async def test_wait_for_inside_a_resumed_coroutine_times_out_only_that_work() -> None:
    async def slow() -> str:
        try:
            await asyncio.wait_for(asyncio.Event().wait(), 0.01)
        except TimeoutError:
            return "timed out"
        return "no"

    assert await eager.gather(slow(), immediate(2)) == ["timed out", 2]
