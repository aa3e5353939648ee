"""``kv_batch``: run the first call alone, then the rest together (XtremeFlow's helper).

Requests that share a long prompt prefix are cheaper once the provider has cached it: the first
call warms the cache, the others then run in parallel and hit it. Unlike XtremeFlow's, a failure
closes the coroutines that will never run and cancels the ones still running, so nothing is
left unawaited or orphaned.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

from .._exceptions import InvalidTaskError

__all__ = ["kv_batch"]

T = TypeVar("T")

_END = object()


def _close_unstarted(items: Iterable[object]) -> None:
    for item in items:
        if inspect.iscoroutine(item) and inspect.getcoroutinestate(item) == inspect.CORO_CREATED:
            item.close()


def _rest(item: object) -> Coroutine[Any, Any, Any]:
    if not asyncio.iscoroutine(item):
        raise InvalidTaskError(f"kv_batch rest elements must be coroutines, got {type(item).__name__}")
    return item


def _arrived(item: object) -> Coroutine[Any, Any, Any]:
    """A rest element from an async iterator, checked as it arrives (XtremeFlow's message: it
    handed the element to ``asyncio.create_task``)."""
    if not asyncio.iscoroutine(item):
        raise InvalidTaskError(f"a coroutine was expected, got {item!r}")
    return item


async def _gather_all(tasks: list[asyncio.Task[T]]) -> list[T]:
    """All results in order; on the first error the others are cancelled, then it is raised."""
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _from_list(items: list[Awaitable[T]]) -> list[T]:
    if not items:
        return []
    first = await items[0]
    return [first, *await _gather_all([asyncio.create_task(_rest(aw)) for aw in items[1:]])]


async def _from_async(source: AsyncIterator[Awaitable[T]], seen: list[object]) -> list[T]:
    try:
        first_aw = await anext(source)
    except StopAsyncIteration:
        return []
    seen.append(first_aw)
    if not inspect.isawaitable(first_aw):
        raise InvalidTaskError(f"kv_batch first element must be awaitable, got {type(first_aw).__name__}")
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def collect() -> None:  # keeps pulling from the source while the first call runs
        try:
            async for item in source:
                seen.append(item)
                queue.put_nowait(item)
        finally:
            queue.put_nowait(_END)

    collector = asyncio.create_task(collect())
    tasks: list[asyncio.Task[T]] = []
    try:
        first = await first_aw
        while (item := await queue.get()) is not _END:
            tasks.append(asyncio.create_task(_arrived(item)))
        await collector  # re-raises a failure of the source
    except BaseException:
        collector.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(collector, *tasks, return_exceptions=True)
        raise
    return [first, *await _gather_all(tasks)]


def kv_batch(aws: Iterable[Awaitable[T]] | AsyncIterator[Awaitable[T]]) -> asyncio.Task[list[T]]:
    """A task that awaits the first awaitable alone, then the rest (coroutines) concurrently.

    Results come in input order. From an iterable, a rest element that is not a coroutine raises
    ``InvalidTaskError`` (a ``TypeError``) here; from an async iterator, when it arrives; the
    messages are XtremeFlow's.
    Must be called with an event loop running.
    """
    if isinstance(aws, AsyncIterator):
        seen: list[object] = []
        task = asyncio.create_task(_from_async(aws, seen))
    else:
        if not isinstance(aws, Iterable):
            raise InvalidTaskError(f"kv_batch argument must be an iterable, not {type(aws).__name__}")
        items = list(aws)
        try:
            if items and not inspect.isawaitable(items[0]):
                raise InvalidTaskError(f"kv_batch first element must be awaitable, got {type(items[0]).__name__}")
            for item in items[1:]:
                _ = _rest(item)
            task = asyncio.create_task(_from_list(items))
        except BaseException:
            _close_unstarted(items)
            raise
        seen = list(items)
    task.add_done_callback(lambda _: _close_unstarted(seen))
    return task
