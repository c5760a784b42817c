"""Per-caller rate limit: a token bucket per principal id."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """Token bucket per caller: ``per_minute`` tokens refill continuously, up to ``burst``."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # who -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, who: str) -> float:
        """Spend one token; returns 0 when allowed, else the seconds until a token is free."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                if len(self._buckets) > 10_000:  # forget callers whose bucket is full again
                    self._buckets = {
                        k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst
                    }
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate
