"""A trickle request's retries: Backoff delays, then a TrickleError once none are left."""

from __future__ import annotations

import asyncio

from relay_server.backoff import Backoff
from relay_server.trickle.errors import TrickleError


class RetryBudget:
    """The retries left to one operation on `target`."""

    def __init__(self, backoff: Backoff, target: str) -> None:
        self._backoff = backoff
        self._target = target
        self._delays = backoff.delays()

    async def pause(self, failure: str) -> float:
        """Sleep before the next try and return the delay; raise TrickleError when none is left."""
        delay = next(self._delays, None)
        if delay is None:
            raise TrickleError(f"{self._target}: giving up after {self._backoff.attempts} retries: {failure}")
        await asyncio.sleep(delay)
        return delay
