"""Retry timing after failures (never used to discover work)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass

from relay_server.trickle.errors import TrickleError


@dataclass(frozen=True)
class Backoff:
    """Exponential delays with jitter: `initial`, then ×`factor` up to `maximum`, `attempts` times."""

    initial: float = 0.3
    factor: float = 2.0
    maximum: float = 4.0
    attempts: int = 5
    jitter: float = 0.1

    def delays(self) -> Iterator[float]:
        delay = self.initial
        for _ in range(self.attempts):
            yield delay * (1.0 + random.uniform(-self.jitter, self.jitter))
            delay = min(delay * self.factor, self.maximum)

    def budget(self, target: str) -> RetryBudget:
        return RetryBudget(self, target)


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
