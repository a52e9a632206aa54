"""Token-bucket rate limits: per client for the guest routes, per host for outbound fetches (AMD KDS).

The table of buckets is bounded: when full, the least recently used bucket is dropped (a dropped client
starts again with a full bucket, which errs towards service, never towards unbounded memory).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    """`per_second` tokens refill continuously up to `burst`."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")


class RateLimiter:
    """A bounded map of token buckets keyed by a client string."""

    def __init__(
        self, rate: Rate, *, max_keys: int = 10000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `key`'s bucket if it has them."""
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.pop(key, (float(self.rate.burst), now))
            tokens = min(float(self.rate.burst), tokens + (now - stamp) * self.rate.per_second)
            allowed = tokens >= cost
            if allowed:
                tokens -= cost
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return allowed

    def wait_time(self, key: str, cost: float = 1.0) -> float:
        """Seconds until `key` could spend `cost` tokens (0 if now)."""
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.get(key, (float(self.rate.burst), now))
        tokens = min(float(self.rate.burst), tokens + (now - stamp) * self.rate.per_second)
        return max(0.0, (cost - tokens) / self.rate.per_second)
