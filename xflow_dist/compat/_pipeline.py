"""``async_pipeline``: a producer fills a queue, workers process it, results stream out.

XtremeFlow's helper for chaining tiers: the producer typically starts scheduler tasks (bounded by
one budget) and ``process_item`` awaits them and feeds the next tier. One worker processes in
order, and only as fast as the caller reads; several workers yield in completion order, and with
``max_workers`` their number follows the backlog. Unlike XtremeFlow's, the end of input is marked
privately, so ``None`` is an ordinary item.
"""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any

from .._exceptions import ConfigurationError

__all__ = ["async_pipeline"]

_END = object()  # no more input
_STOP = object()  # one worker should exit
_RESULT, _ERROR, _DONE = "result", "error", "done"


def _check(workers: int, max_workers: int | None, load_factor: float, check_interval: float) -> int | None:
    for what, value in (("workers", workers), ("max_workers", max_workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"{what} must be a whole number of at least 1, not {value!r}")
    for what, number in (("load_factor", load_factor), ("check_interval", check_interval)):
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number) or number <= 0:
            raise ConfigurationError(f"{what} must be finite and more than zero, not {number!r}")
    if max_workers is not None and max_workers < workers:
        warnings.warn("Max workers should be greater than workers", stacklevel=3)
        return None
    return max_workers


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def async_pipeline(
    producer: Callable[[asyncio.Queue[Any]], Coroutine[Any, Any, Any]],
    process_item: Callable[[Any], Awaitable[Any]] | None = None,
    workers: int = 1,
    max_workers: int | None = None,
    load_factor: float = 2,
    check_interval: float = 1.0,
) -> AsyncGenerator[Any, None]:
    """Run ``producer(queue)`` and yield ``await process_item(item)`` (or the item) for each item.

    The first error of the producer or of a worker stops the pipeline and is raised here; closing
    the generator early cancels the producer and the workers. With ``max_workers``, every
    ``check_interval`` seconds the pool is resized to backlog / ``load_factor`` workers, between
    ``workers`` and ``max_workers``.
    """
    max_workers = _check(workers, max_workers, load_factor, check_interval)
    inq: asyncio.Queue[Any] = asyncio.Queue()
    producer_task = asyncio.create_task(producer(inq))

    if workers == 1 and max_workers is None:

        async def mark_end() -> None:
            try:
                await producer_task
            finally:
                inq.put_nowait(_END)

        ender = asyncio.create_task(mark_end())
        try:
            while (item := await inq.get()) is not _END:
                yield (await process_item(item)) if process_item is not None else item
        finally:
            await _stop(producer_task, ender)
        if not producer_task.cancelled() and (exc := producer_task.exception()) is not None:
            raise exc
        return

    out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    pool: set[asyncio.Task[None]] = set()
    busy = stopping = 0

    async def work() -> None:
        nonlocal busy, stopping
        while True:
            item = await inq.get()
            try:
                if item is _STOP:
                    stopping -= 1
                    return
                busy += 1
                try:
                    result = (await process_item(item)) if process_item is not None else item
                finally:
                    busy -= 1
                out.put_nowait((_RESULT, result))  # before task_done: every result precedes _DONE
            except Exception as exc:
                out.put_nowait((_ERROR, exc))
                return
            finally:
                inq.task_done()

    def start_worker() -> None:
        task = asyncio.create_task(work())
        pool.add(task)
        task.add_done_callback(pool.discard)

    def resize(limit: int) -> None:
        nonlocal stopping
        live = len(pool) - stopping
        target = max(workers, min(limit, math.ceil((inq.qsize() + busy) / load_factor)))
        for _ in range(target - live):
            start_worker()
        if target < live and inq.empty():
            for _ in range(live - target):
                stopping += 1
                inq.put_nowait(_STOP)

    async def monitor() -> None:
        try:
            if max_workers is not None:
                while not producer_task.done() or not inq.empty():
                    if producer_task.done():
                        if producer_task.exception() is not None:
                            break
                        await asyncio.sleep(check_interval)
                    else:  # wakes early when the producer ends
                        await asyncio.wait({producer_task}, timeout=check_interval)
                    resize(max_workers)
            await producer_task
            await inq.join()
        except Exception as exc:
            out.put_nowait((_ERROR, exc))
        else:
            out.put_nowait((_DONE, None))

    for _ in range(workers):
        start_worker()
    monitor_task = asyncio.create_task(monitor())
    try:
        while True:
            kind, value = await out.get()
            if kind == _RESULT:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        await _stop(producer_task, monitor_task, *pool)
