"""arbstr's own limits on chat requests: ``rate_limit_rps`` as a token bucket (SPEC §1). Thread-safe."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """`rate_limit_rps` as a token bucket holding one second of burst."""

    def __init__(self, rate: float, clock=time.monotonic) -> None:
        self._rate = rate
        self._capacity = max(rate, 1.0)
        self._tokens = self._capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self._rate
