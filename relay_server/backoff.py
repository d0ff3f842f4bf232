"""Retry timing after failures (never used to discover work)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


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
