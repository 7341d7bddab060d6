"""Recent latency per provider for the `lowest_latency` strategy: bounded, in memory, thread-safe."""

from __future__ import annotations

import statistics
import threading
from collections import deque

WINDOW = 50


class LatencyWindow:
    def __init__(self, size: int = WINDOW) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {}

    def add(self, provider: str, latency_ms: float) -> None:
        with self._lock:
            self._samples.setdefault(provider, deque(maxlen=self._size)).append(latency_ms)

    def median(self, provider: str) -> float | None:
        with self._lock:
            samples = self._samples.get(provider)
            return statistics.median(samples) if samples else None
