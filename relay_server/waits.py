"""Awaiting work that an event may cut short (a stop, a drain): whichever comes first, the other
is cancelled and awaited, so no task is left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


async def until_set(work: Awaitable[_T], event: asyncio.Event) -> asyncio.Future[_T]:
    """Await `work` until it ends or `event` is set; return it as a future: done (its result or
    error), or cancelled when the event came first."""
    task = asyncio.ensure_future(work)
    setting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((task, setting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, setting):
            waiting.cancel()  # nothing for one that is done
        await asyncio.gather(task, setting, return_exceptions=True)
    return task
